"""`python -m common.train --config=common/configs/dense_tiny.py --workdir=DIR [--config.KEY=VALUE ...]`

Trains a shared model (the dense LM) on `data.*`; rerun the same command to resume.
"""
import os
import sys

# Before JAX is imported: jaxlib starts C++ (absl) logging with this level, and TensorFlow (imported later by
# the data pipeline) then logs through it; at the default level its CUDA probe prints an 'E0000 ... cuInit'
# line on machines without a GPU, which would break "one clear line on stderr". Set it to 0 to see all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from common import distributed  # pylint: disable=g-import-not-at-top
from common.config import ConfigError, parse_argv, run_main  # pylint: disable=g-import-not-at-top


def main(argv, make_task=None, validate=None) -> int:
  """The trainer command line of every package: `make_task(cfg) -> Task` (default: the LM task) and
  `validate(cfg)`, the package's cheap model checks (default: the dense LM's)."""
  cfg, flags = parse_argv(argv, extra_flags=distributed.FLAGS)
  if not flags.get("workdir"):
    raise ConfigError("missing --workdir=DIR")
  distributed.initialize(flags)
  from common import sharding
  from common.tasks.lm import lm_task, validate_model_early
  from common.train.loop import train, validate_loop_config
  # Cheap checks first, so that bad input fails before the data cache is built (which logs to stderr).
  validate_loop_config(cfg, sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes))
  (validate or validate_model_early)(cfg)
  return train(cfg, flags["workdir"], (make_task or lm_task)(cfg))


def cli(make_task=None, validate=None) -> None:
  """`python -m <package>.train ...`: runs `main` on sys.argv with exit status 2 for bad input."""
  run_main(lambda: main(sys.argv[1:], make_task, validate))


if __name__ == "__main__":
  cli()
