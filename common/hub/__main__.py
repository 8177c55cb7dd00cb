"""`python -m common.hub list | show NAME | publish --workdir=RUN --name=NAME [--merge_lora] |
import_hf --path=HF_DIR --name=NAME` [--root=DIR]

Lists and shows the library's entries, publishes a training run (common.train or common.train.sft, full or
LoRA) as an entry (`common.hub.publish`), and imports a Hugging Face Llama or Qwen2 folder
(`common.hub.import_hf`).
"""
from __future__ import annotations

import argparse
import json
import sys

from common.cli import ArgumentParser
from common.config import run_main
from common.hub.import_hf import import_hf
from common.hub.publish import publish
from common.models.checkpoint_library import describe, hub_root, list_checkpoints


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
  imp = commands.add_parser("import_hf", help="register a local Hugging Face Llama or Qwen2 checkpoint folder")
  imp.add_argument("--path", required=True, help="the folder (config.json, *.safetensors, tokenizer files)")
  imp.add_argument("--name", required=True, help="the new entry's name")
  imp.add_argument("--dtype", default="float32", help="compute dtype of the stored config (model.dtype)")
  imp.add_argument("--overwrite", action="store_true", help="replace an entry of that name")
  imp.add_argument("--root", default=argparse.SUPPRESS)
  return p


def main(argv: list[str]) -> int:
  args = parser().parse_args(argv)
  root = args.root or None
  if args.command == "publish":
    folder = publish(args.workdir, args.name, merge_lora=args.merge_lora, root=root)
    print(f"published {args.workdir} as '{args.name}' at {folder}")
  elif args.command == "import_hf":
    folder = import_hf(args.path, args.name, root=root, dtype=args.dtype, overwrite=args.overwrite)
    print(f"imported {args.path} as '{args.name}' at {folder}")
  elif args.command == "list":
    print(f"# {hub_root(root)}")
    print(_table(root) if list_checkpoints(root) else "(no checkpoints)")
  else:
    print(json.dumps(describe(args.name, root), indent=2))
  return 0


if __name__ == "__main__":
  run_main(lambda: main(sys.argv[1:]))
