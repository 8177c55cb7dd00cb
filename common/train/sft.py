"""`python -m common.train.sft --config=common/configs/sft_tiny.py --workdir=DIR [--config.KEY=VALUE ...]`

Supervised fine-tuning (full or LoRA) of a hub checkpoint (`model.init_from`) or a random dense LM on packed
prompt/response or chat examples, with the common trainer's checkpoints, resume and metrics.
"""
from __future__ import annotations

import os

# Before JAX is imported (see common.train.__main__): keeps TensorFlow's CUDA probe off stderr.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from common.train.__main__ import cli, main as train_main  # pylint: disable=g-import-not-at-top


def make_task(cfg):
  from common.tasks.sft import sft_task  # pylint: disable=g-import-not-at-top
  return sft_task(cfg)


def validate(cfg) -> None:
  from common.tasks.sft import validate_sft_config  # pylint: disable=g-import-not-at-top
  validate_sft_config(cfg)


def main(argv) -> int:
  """The command line on `argv` (tests call it in-process); raises ConfigError on bad input."""
  return train_main(argv, make_task, validate)


if __name__ == "__main__":
  cli(make_task, validate)
