"""`python -m blt.train_entropy --config=blt/configs/entropy_tiny.py --workdir=DIR [--config.K=V ...]`

Trains BLT's entropy model (Pagnoni et al. 2024, Sec. 2.3): a small causal byte LM with a sliding attention
window (the paper's is ~100M parameters with a window of 512 bytes), here the common dense LM on the byte
corpus, trained by the shared trainer (`common.train`: resume, SIGTERM, exit 2 on bad input). Its workdir is
what `model.patching.entropy_model` of `blt.train` and `--entropy_model` of `blt.calibrate` name; they read
DIR/config.json and the newest checkpoint (`blt.entropy.load_entropy_model`).
"""
from __future__ import annotations

from common.config import require
from common.tasks import lm
from common.train.__main__ import cli as common_cli


def resolve(cfg):
  """The dense LM's resolve, for bytes only: the entropy model reads what BLT reads (data.vocab 'byte')."""
  require(cfg.data.vocab == "byte", "data.vocab", f"the entropy model reads bytes; must be 'byte', got '{cfg.data.vocab}'")
  return lm.resolve(cfg)


def validate_entropy_config(cfg) -> None:
  """The dense LM's checks of the resolved config (`resolve`), and that it is the dense LM."""
  require(cfg.model.get("name") == "dense_lm", "model.name",
          f"the entropy model is the common dense LM ('dense_lm'), got '{cfg.model.get('name')}'")
  lm.validate(cfg)


def cli() -> None:
  common_cli(lm.lm_task, validate_entropy_config, resolve)

if __name__ == "__main__":
  cli()
