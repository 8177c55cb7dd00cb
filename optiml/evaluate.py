"""Scores of a model on the three levels of held-out evaluation (Iyer et al. 2022, sec. 3.2 and 4.1): each task
by its own metric, exact match or ROUGE-L of a greedy answer (`common.generate`, cut at the first newline) or
accuracy by rank classification over the task's options (the option with the highest log-likelihood after the
prompt, `common.scoring`), x100; 0-shot and k-shot (k demonstrations from the task's own examples, never the
instance itself, drawn per instance by a seed). A level's score is the mean over its tasks; per category too.

`python -m optiml.evaluate --workdir=DIR [--shots=0,2] [--max_per_task=N]` prints them for one run as JSON.
"""
from __future__ import annotations

import json
import sys
import zlib
from typing import Sequence

import numpy as np
from flax import nnx

from common.cli import ArgumentParser
from common.config import ConfigError, run_main
from common.eval.text_metrics import exact_match, rouge_l
from common.generate import generate
from common.models import build_model
from common.scoring import score_continuations
from common.tokenizers import Tokenizer
from common.train.restore import load_run_model, read_run_config
from optiml import data as optiml_data
from optiml import train as optiml_train

MAX_NEW_TOKENS = 48
GENERATE_BATCH = 512


def text_score(metric: str, prediction: str, references: Sequence[str]) -> float:
  """1/0 exact match (SQuAD normalisation) or the best ROUGE-L F over the references."""
  if metric == "exact_match":
    return exact_match(prediction, references)
  if metric == "rouge_l":
    return rouge_l(prediction, references)
  raise ValueError(f"unknown text metric '{metric}'")


def rank_classify(model: nnx.Module, tokenizer: Tokenizer, prompts: Sequence[str],
                  options: Sequence[Sequence[str]]) -> list[int]:
  """For each prompt the index of its most likely option (summed log-likelihood of ' option'), all pairs in
  one batched scoring pass; the same choice as `common.scoring.choose` per prompt."""
  pairs = [(p, o) for p, opts in zip(prompts, options) for o in opts]
  scored = score_continuations(model, [tokenizer.encode(p) for p, _ in pairs],
                               [tokenizer.encode(" " + o) for _, o in pairs], vocab_size=tokenizer.vocab_size)
  out, at = [], 0
  for opts in options:
    out.append(int(np.argmax([s.logprob for s in scored[at:at + len(opts)]])))
    at += len(opts)
  return out


def greedy_answers(model: nnx.Module, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
  """Greedy continuations up to EOS or the first line break after the answer begins, in length-sorted
  batches."""
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out = [""] * len(prompts)
  for start in range(0, len(order), GENERATE_BATCH):
    chunk = order[start:start + GENERATE_BATCH]
    rows = generate(model, [tokenizer.encode(prompts[i]) for i in chunk], max_new_tokens=max_new_tokens,
                    stop_ids=tokenizer.stop_ids, tokenizer=tokenizer)
    for i, row in zip(chunk, rows):
      out[i] = tokenizer.decode(row).strip().split("\n")[0].strip()
  return out


def eval_items(split: optiml_data.Split, shots: int, seed: int, max_per_task: int = 0) -> list[dict]:
  """Every evaluation instance of every level with its prompt (`shots` demonstrations, seeded per task and
  instance so each run sees the same prompts)."""
  items = []
  for level, entries in split.evals.items():
    for task, instances, pool in entries:
      chosen = instances[:max_per_task] if max_per_task > 0 else instances
      for index, item in enumerate(chosen):
        rng = np.random.default_rng([seed, zlib.crc32(task.name.encode()), index])
        demos = optiml_data.pick_demos(pool, item, shots, rng)
        items.append(dict(level=level, task=task, item=item, prompt=optiml_data.render_prompt(task, item, demos)))
  return items


def evaluate_split(model: nnx.Module, tokenizer: Tokenizer, split: optiml_data.Split, *, shots: Sequence[int],
                   seed: int = 0, max_per_task: int = 0) -> dict:
  """{'<level>/<k>shot': mean task score, '<level>/<k>shot/<category>': ..., 'avg/<k>shot': mean of the
  levels, 'examples': a few predictions}."""
  out: dict = {"examples": []}
  for k in shots:
    items = eval_items(split, int(k), seed, max_per_task)
    scores = np.zeros(len(items))
    ranked = [i for i, x in enumerate(items) if x["task"].metric == "accuracy"]
    if ranked:
      picks = rank_classify(model, tokenizer, [items[i]["prompt"] for i in ranked],
                            [items[i]["task"].options for i in ranked])
      for i, p in zip(ranked, picks):
        scores[i] = float(items[i]["task"].options[p] in items[i]["item"].references)
    generated = [i for i, x in enumerate(items) if x["task"].metric != "accuracy"]
    if generated:
      longest = max(len(tokenizer.encode(" " + r)) for i in generated for r in items[i]["item"].references)
      answers = greedy_answers(model, tokenizer, [items[i]["prompt"] for i in generated],
                               min(MAX_NEW_TOKENS, longest + 2))
      for i, answer in zip(generated, answers):
        scores[i] = text_score(items[i]["task"].metric, answer, items[i]["item"].references)
        if len(out["examples"]) < 12 and i % 37 == 0:
          out["examples"].append(dict(shots=int(k), task=items[i]["task"].name, prompt=items[i]["prompt"][-120:],
                                      answer=answer, reference=items[i]["item"].output))
    levels = []
    for level in optiml_data.LEVELS:
      per_task: dict[str, list[float]] = {}
      categories: dict[str, str] = {}
      for x, s in zip(items, scores):
        if x["level"] == level:
          per_task.setdefault(x["task"].name, []).append(100 * s)
          categories[x["task"].name] = x["task"].category
      if not per_task:
        continue
      task_means = {name: float(np.mean(v)) for name, v in per_task.items()}
      out[f"{level}/{k}shot"] = float(np.mean(list(task_means.values())))
      levels.append(out[f"{level}/{k}shot"])
      for category in sorted(set(categories.values())):
        out[f"{level}/{k}shot/{category}"] = float(np.mean(
            [m for name, m in task_means.items() if categories[name] == category]))
    out[f"avg/{k}shot"] = float(np.mean(levels))
  return out


def main(argv=None) -> int:
  parser = ArgumentParser(prog="python -m optiml.evaluate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="an optiml.train run")
  parser.add_argument("--shots", default="0,2", help="comma list of demonstration counts, e.g. 0,2")
  parser.add_argument("--max_per_task", type=int, default=0, help="evaluation instances per task (0: all)")
  args = parser.parse_args(argv)
  try:
    shots = [int(s) for s in args.shots.split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"--shots: expected a comma list of integers, got '{args.shots}'") from None
  if not shots or min(shots) < 0:
    raise ConfigError(f"--shots: expected integers >= 0, got '{args.shots}'")
  cfg = read_run_config(args.workdir, "--workdir")
  _, split, tokenizer = optiml_train.data_for(cfg)
  model = load_run_model(args.workdir, cfg, lambda: build_model(cfg.model, seed=0), key="--workdir")[0]
  result = evaluate_split(model, tokenizer, split, shots=shots, max_per_task=args.max_per_task)
  json.dump(result, sys.stdout, indent=1)
  print()
  return 0


if __name__ == "__main__":
  run_main(main)
