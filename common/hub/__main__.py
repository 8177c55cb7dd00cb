"""`python -m common.hub list | show NAME | publish --workdir=RUN --name=NAME [--merge_lora]` [--root=DIR]

Lists and shows the library's entries, and publishes a training run (common.train or common.train.sft, full or
LoRA) as an entry. Publishing reads the run through `common.train.restore`, which is why this command sits
above the library (`common.hub.library`, a models-floor module) in the floor order.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections
from etils import epath
from flax import nnx

from common.cli import ArgumentParser
from common.config import ConfigError, run_main
from common.hub.library import describe, entry_tokenizer, hub_root, list_checkpoints, save
from common.models import build_model
from common.nn import lora
from common.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer
from common.train.restore import load_run_model, read_run_config


def _run_tokenizer(cfg) -> Tokenizer | None:
  """The tokenizer a run of `common.train` (data.vocab) or `common.train.sft` (its hub base's, else
  data.tokenizer) trained with."""
  base = cfg.model.get("init_from", "")
  if base:
    return entry_tokenizer(base)
  if "tokenizer" in cfg.data:
    return load_tokenizer(cfg.data.tokenizer, cfg.data.get("tokenizer_path", ""))
  if cfg.data.get("vocab") == "spm":
    return load_tokenizer("spm", cfg.data.spm_model)
  return ByteTokenizer() if cfg.data.get("vocab", "byte") == "byte" else None


def _last_eval(workdir: str) -> dict[str, float]:
  """The newest eval line of DIR/metrics.jsonl (step and `eval/*` values), or {}."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
  return {k: v for k, v in evals[-1].items() if k == "step" or k.startswith("eval/")} if evals else {}


def publish(workdir: str, name: str, *, merge_lora: bool = False, root: str | os.PathLike | None = None
            ) -> epath.Path:
  """Registers the newest checkpoint of a training run as library entry `name`: a plain dense model, LoRA
  adapters folded into the base weights (`merge_lora`, needed for a LoRA run), its tokenizer, and metadata
  naming the run, the step and the run's last eval metrics. The run is read, never changed; an existing name
  is never replaced."""
  if (hub_root(root) / name).exists():
    raise ConfigError(f"hub checkpoint '{name}': already exists in '{hub_root(root)}' (publish never replaces "
                      "an entry; choose another --name)")
  cfg = read_run_config(workdir, "--workdir")
  rank = int(cfg.get("lora", {}).get("rank", 0))
  if rank and not merge_lora:
    raise ConfigError(f"--workdir '{workdir}': the run trained LoRA adapters (rank {rank}); pass --merge_lora to "
                      "fold them into the base weights")

  def build():
    model = build_model(cfg.model, seed=0)
    if rank:
      lora.apply_lora(model, rank, float(cfg.lora.alpha), tuple(cfg.lora.targets), rngs=nnx.Rngs(params=0))
    return model

  model, step = load_run_model(workdir, cfg, build, key="--workdir", trainable=lora.LoRAParam if rank else None)
  if rank:
    lora.merge_lora(model)
  model_cfg = ml_collections.ConfigDict({k: v for k, v in cfg.model.to_dict().items() if k != "init_from"})
  metadata = {"source_run": os.path.abspath(workdir), "step": step, "base": cfg.model.get("init_from", ""),
              "lora_rank_merged": rank, "eval": _last_eval(workdir)}
  return save(name, model_cfg, model, tokenizer=_run_tokenizer(cfg), metadata=metadata, root=root)


def _table(root) -> str:
  rows = [("name", "params", "d_model", "layers", "vocab", "tokenizer", "created")]
  for name in list_checkpoints(root):
    entry = describe(name, root)
    m = entry["model_config"]
    rows.append((name, f"{entry['num_params']:,}", str(m.get("d_model", "")), str(m.get("n_layers", "")),
                 str(m.get("vocab_size", "")), (entry.get("tokenizer") or {}).get("kind", "-"), entry["created"]))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog="python -m common.hub", description=__doc__.split("\n\n")[1])
  p.add_argument("--root", default="", help="library folder (default: $META_PAPERS_HUB or ~/.cache/...)")
  commands = p.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="the entries, one line each").add_argument("--root", default=argparse.SUPPRESS)
  show = commands.add_parser("show", help="one entry's entry.json and model config")
  show.add_argument("name")
  show.add_argument("--root", default=argparse.SUPPRESS)
  pub = commands.add_parser("publish", help="register a training run's newest checkpoint")
  pub.add_argument("--workdir", required=True, help="the run's workdir")
  pub.add_argument("--name", required=True, help="the new entry's name")
  pub.add_argument("--merge_lora", action="store_true", help="fold LoRA adapters into the base")
  pub.add_argument("--root", default=argparse.SUPPRESS)
  return p


def main(argv: list[str]) -> int:
  args = parser().parse_args(argv)
  root = args.root or None
  if args.command == "publish":
    folder = publish(args.workdir, args.name, merge_lora=args.merge_lora, root=root)
    print(f"published {args.workdir} as '{args.name}' at {folder}")
  elif args.command == "list":
    print(f"# {hub_root(root)}")
    print(_table(root) if list_checkpoints(root) else "(no checkpoints)")
  else:
    print(json.dumps(describe(args.name, root), indent=2))
  return 0


if __name__ == "__main__":
  run_main(lambda: main(sys.argv[1:]))
