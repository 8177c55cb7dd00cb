"""`python -m common.evaluate --model=HUB_NAME_OR_RUN_DIR --tasks=gsm8k,math500 --output=DIR [--num_fewshot=4]
[--limit=N] [--data_path TASK=FILE ...]`

Evaluates a dense LM (a hub entry, or a training run's newest checkpoint) on registered tasks: per-sample lines
in DIR/samples_TASK.jsonl, each metric's mean and standard error in DIR/results.json. Rerunning with the same
DIR computes only what is not logged yet. Without --data_path a task runs on its small offline default.
"""
from __future__ import annotations

import argparse
import os
import sys

from common.cli import ArgumentParser
from common.config import ConfigError, run_main
from common.eval.tasks import TASKS, get_tasks
from common.evaluate.language_model import LanguageModel
from common.evaluate.runner import prepare, run
from common.hub.publish import run_tokenizer
from common.models import build_model
from common.models.checkpoint_library import load
from common.train.restore import load_run_model, read_run_config


def parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog="python -m common.evaluate", description=__doc__.split("\n\n")[1])
  p.add_argument("--model", required=True, help="a hub entry name or a training run's workdir")
  p.add_argument("--tasks", required=True, help=f"comma-separated task names: {', '.join(sorted(TASKS))}")
  p.add_argument("--output", required=True, help="folder of the per-sample logs and results.json")
  p.add_argument("--num_fewshot", type=int, default=0, help="solved examples before each prompt")
  p.add_argument("--limit", type=int, default=0, help="evaluate each task's first N documents (0: all)")
  p.add_argument("--batch_size", type=int, default=16, help="documents per model call")
  p.add_argument("--max_new_tokens", type=int, default=256, help="generation budget per document")
  p.add_argument("--seed", type=int, default=0, help="few-shot sampling seed")
  p.add_argument("--max_length", type=int, default=0,
                 help="the model's window in tokens (0: model.max_len, else 2048); longer contexts lose their start")
  p.add_argument("--rolling_stride", type=int, default=0,
                 help="tokens a rolling-loglikelihood window advances (0: the window, disjoint windows)")
  p.add_argument("--data_path", action="extend", nargs="+", metavar="TASK=FILE",
                 help="a jsonl file of a task's documents instead of its offline default")
  p.add_argument("--fewshot_path", action="extend", nargs="+", metavar="TASK=FILE",
                 help="a jsonl file of a task's few-shot examples (default: the other evaluated documents)")
  p.add_argument("--hub_root", default="", help="library folder of --model (default: $META_PAPERS_HUB or ~/.cache/...)")
  return p


def _pairs(flag: str, values: list[str]) -> dict[str, str]:
  out = {}
  for value in values:
    name, eq, path = value.partition("=")
    if not eq or not name or not path:
      raise ConfigError(f"{flag} {value}: expected TASK=FILE")
    out[name] = path
  return out


def load_model(spec: str, hub_root: str = ""):
  """(model, tokenizer) of a training run's workdir (newest checkpoint) or a hub entry."""
  if os.path.isdir(spec):
    cfg = read_run_config(spec, "--model")
    if int(cfg.get("lora", {}).get("rank", 0)):
      raise ConfigError(f"--model={spec}: a LoRA run; publish it with `python -m common.hub publish "
                        "--merge_lora` and evaluate the hub entry")
    model, _ = load_run_model(spec, cfg, lambda: build_model(cfg.model, seed=0), key="--model")
    tokenizer = run_tokenizer(cfg)
  elif os.sep in spec or spec.startswith("."):
    raise ConfigError(f"--model={spec}: no such training run directory")
  else:
    try:
      _, model, tokenizer, _ = load(spec, root=hub_root or None)
    except ConfigError as e:
      raise ConfigError(f"--model: {e}") from None
  if tokenizer is None:
    raise ConfigError(f"--model={spec}: the model has no tokenizer to read its prompts with")
  return model, tokenizer


def main(argv: list[str]) -> int:
  args = parser().parse_args(argv)
  for flag, least in (("batch_size", 1), ("max_length", 0), ("rolling_stride", 0)):
    if getattr(args, flag) < least:
      raise ConfigError(f"--{flag}={getattr(args, flag)}: must be >= {least}")
  data_paths, fewshot_paths = _pairs("--data_path", args.data_path or []), _pairs("--fewshot_path",
                                                                                      args.fewshot_path or [])
  prepared = prepare(get_tasks(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed,
                     data_paths=data_paths, fewshot_paths=fewshot_paths, max_new_tokens=args.max_new_tokens)
  model, tokenizer = load_model(args.model, args.hub_root)
  lm = LanguageModel(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                     rolling_stride=args.rolling_stride, seed=args.seed)
  if args.max_new_tokens >= lm.max_length and any(p.task.output_type == "generate_until" for p in prepared):
    raise ConfigError(f"--max_new_tokens={args.max_new_tokens}: leaves no room for a prompt in the model's window "
                      f"of {lm.max_length} tokens (--max_length)")
  summary = run(lm, prepared, args.output, config=dict(vars(args), max_length=lm.max_length,
                                                       rolling_stride=lm.rolling_stride))
  for name, result in summary["results"].items():
    for metric, value in result["metrics"].items():
      stderr = f" +- {value['stderr']:.4f}" if value["stderr"] is not None else ""
      print(f"{name}  {metric}  {value['value']:.4f}{stderr}  (n={result['num_docs']})")
  print(f"wrote {os.path.join(args.output, 'results.json')}")
  return 0


if __name__ == "__main__":
  run_main(lambda: main(sys.argv[1:]))
