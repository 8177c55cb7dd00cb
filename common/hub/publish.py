"""Publishing a training run (common.train, or common.train.sft full or LoRA) as a library entry: the run is
read through `common.train.restore`, never changed, and LoRA adapters can be folded into the base weights."""
from __future__ import annotations

import json
import os

import ml_collections
from etils import epath
from flax import nnx

from common.config import ConfigError
from common.models import build_model
from common.models.dense_lm import unrolled
from common.models.checkpoint_library import entry_tokenizer, hub_root, save
from common.nn import lora
from common.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer
from common.train.restore import load_run_model, read_run_config


def run_tokenizer(cfg) -> Tokenizer | None:
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
  model = unrolled(model)  # a scanned run is stored unrolled: what decoding, LoRA and the HF export read
  model_cfg = ml_collections.ConfigDict({k: v for k, v in cfg.model.to_dict().items() if k != "init_from"})
  if "scan_layers" in model_cfg:
    model_cfg.scan_layers = False
  metadata = {"source_run": os.path.abspath(workdir), "step": step, "base": cfg.model.get("init_from", ""),
              "lora_rank_merged": rank, "eval": _last_eval(workdir)}
  return save(name, model_cfg, model, tokenizer=run_tokenizer(cfg), metadata=metadata, root=root)
