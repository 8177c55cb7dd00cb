"""`python -m common.train --config=common/configs/dense_tiny.py --workdir=DIR [--config.KEY=VALUE ...]`

Trains a shared model (the dense LM) on `data.*`; rerun the same command to resume.
"""
import sys

# `common/__init__.py`, which Python runs first, has set TF_CPP_MIN_LOG_LEVEL before JAX is imported.
from common import distributed, sharding
from common.config import ConfigError, parse_argv, run_main
from common.tasks import lm
from common.train.loop import check_workdir, train, validate_loop_config
from common.train.resume import parse_allowed

FLAGS = {**distributed.FLAGS, "allow_config_change": "KEY,... config keys a rerun on an existing workdir may "
         "change (the change is recorded in DIR/config.json); others are refused"}


def main(argv, make_task=None, validate=None, resolve=None) -> int:
  """The trainer command line of every package: `resolve(cfg)` fills the derived values (vocab size, ...),
  `validate(cfg)` checks the resolved config once, `make_task(cfg) -> Task` builds (defaults: the LM's). The
  resolved config is what DIR/config.json holds."""
  cfg, flags = parse_argv(argv, extra_flags=FLAGS)
  if not flags.get("workdir"):
    raise ConfigError("missing --workdir=DIR")
  allowed = parse_allowed(flags.get("allow_config_change", ""), cfg)
  distributed.initialize(flags)
  # The one mesh of the run, from mesh.shape/mesh.axes/mesh.dcn_shape. Cheap checks first, so that bad input
  # fails before the data cache is built (which logs to stderr).
  mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes, dcn_shape=cfg.mesh.get("dcn_shape", ()))
  validate_loop_config(cfg, mesh)
  if make_task is None:  # the dense LM
    make_task, validate, resolve = lm.lm_task, lm.validate, lm.resolve
  if resolve is not None:
    cfg = resolve(cfg)
  if validate is not None:
    validate(cfg)
  check_workdir(flags["workdir"], cfg, allowed)
  return train(cfg, flags["workdir"], make_task(cfg), mesh=mesh, allow_config_change=allowed)


def cli(make_task=None, validate=None, resolve=None) -> None:
  """`python -m <package>.train ...`: runs `main` on sys.argv with exit status 2 for bad input."""
  run_main(lambda: main(sys.argv[1:], make_task, validate, resolve))


if __name__ == "__main__":
  cli()
