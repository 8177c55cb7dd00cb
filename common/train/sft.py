"""`python -m common.train.sft --config=common/configs/sft_tiny.py --workdir=DIR [--config.KEY=VALUE ...]`

Supervised fine-tuning (full or LoRA) of a hub checkpoint (`model.init_from`) or a random dense LM on packed
prompt/response or chat examples, with the common trainer's checkpoints, resume and metrics.
"""
from __future__ import annotations

from common.tasks.sft import resolve, sft_task, validate_sft_config
from common.train.__main__ import cli, main as train_main


def main(argv) -> int:
  """The command line on `argv` (tests call it in-process); raises ConfigError on bad input."""
  return train_main(argv, sft_task, validate_sft_config, resolve)


if __name__ == "__main__":
  cli(sft_task, validate_sft_config, resolve)
