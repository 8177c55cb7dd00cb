"""`python -m common.train --config=common/configs/dense_tiny.py --workdir=DIR [--config.KEY=VALUE ...]`

Trains a shared model (the dense LM) on `data.*`; rerun the same command to resume.
"""
import sys

from common import distributed
from common.config import ConfigError, parse_argv, run_main


def main(argv) -> int:
  cfg, flags = parse_argv(argv, extra_flags=distributed.FLAGS)
  if not flags.get("workdir"):
    raise ConfigError("missing --workdir=DIR")
  distributed.initialize(flags)
  from common.train.lm_task import lm_task
  from common.train.loop import train
  return train(cfg, flags["workdir"], lm_task(cfg))


if __name__ == "__main__":
  run_main(lambda: main(sys.argv[1:]))
