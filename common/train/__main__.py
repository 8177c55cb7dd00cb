"""`python -m common.train --config=common/configs/dense_tiny.py --workdir=DIR [--config.KEY=VALUE ...]`

Trains a shared model (the dense LM) on `data.*`; rerun the same command to resume. `--eval_only` evaluates the
run's newest checkpoint instead; `--config.train.init_from=RUN_DIR|HUB_NAME` starts a new run from those
parameters with a fresh optimizer; `--config.log.profile_steps=N:M` traces steps N..M.
"""
import sys

# `common/__init__.py`, which Python runs first, has set TF_CPP_MIN_LOG_LEVEL before JAX is imported.
from common import distributed, sharding
from common.config import ConfigError, parse_argv, run_main
from common.tasks import lm
from common.train.loop import check_eval_only, check_workdir, train, validate_loop_config
from common.train.resume import parse_allowed

FLAGS = {**distributed.FLAGS, "allow_config_change": "KEY,... config keys a rerun on an existing workdir may "
         "change (the change is recorded in DIR/config.json); others are refused"}
SWITCHES = {"eval_only": "evaluate the newest checkpoint (or train.init_from) once into DIR/eval/step_N.json; "
            "no training"}


def main(argv, make_task=None, validate=None, resolve=None) -> int:
  """The trainer command line of every package: `resolve(cfg)` fills the derived values (vocab size, ...),
  `validate(cfg)` checks the resolved config once, `make_task(cfg) -> Task` builds (defaults: the LM's). The
  resolved config is what DIR/config.json holds."""
  cfg, flags = parse_argv(argv, extra_flags=FLAGS, switches=SWITCHES)
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
  eval_only = flags.get("eval_only", "false") == "true"
  if eval_only:
    check_eval_only(flags["workdir"], cfg)
  return train(cfg, flags["workdir"], make_task(cfg), mesh=mesh, allow_config_change=allowed, eval_only=eval_only)


def cli(make_task=None, validate=None, resolve=None) -> None:
  """`python -m <package>.train ...`: runs `main` on sys.argv with exit status 2 for bad input."""
  run_main(lambda: main(sys.argv[1:], make_task, validate, resolve))


if __name__ == "__main__":
  cli()
