"""A training run read back as a model: DIR/config.json and the parameters of the newest complete checkpoint,
on one device, for generation, scoring or as a frozen component of another model (BLT's entropy model).

Read-only: unlike the trainer's resume, a corrupt checkpoint is skipped, never set aside, since the run
may belong to someone else or still be going. Errors are ConfigErrors naming the config key (or flag) that
pointed at the run and the path.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from common.config import ConfigError
from common.train.workdir import run_path


def _refuse(key: str, what: str) -> ConfigError:
  where = key if key.startswith("--") else f"config key '{key}'"
  return ConfigError(f"{where}: {what}")


def read_run_config(workdir: str, key: str) -> ml_collections.ConfigDict:
  """DIR/config.json of a training run, as the trainer resolved it."""
  if not workdir:
    raise _refuse(key, "no run given (an empty path)")
  path = run_path(workdir) / "config.json"
  if not path.is_file():
    raise _refuse(key, f"'{workdir}' holds no config.json (not a training run's workdir)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    raise _refuse(key, f"'{path}' is unreadable ({e})") from None


def load_run_model(workdir: str, cfg, build_model: Callable[[], nnx.Module], *, key: str,
                   trainable: Any = None) -> tuple[nnx.Module, int]:
  """(model with the run's newest complete parameters, its step). `build_model` builds the run's model from
  `cfg` (the run's config, from `read_run_config`); `trainable` is the filter the run trained with (its
  optimizer state has that layout)."""
  from common.train.checkpoint import Checkpointer
  from common.train.optim import make_optimizer, only_trainable
  from common.train.step import init_state
  checkpoint_dir = run_path(workdir) / "checkpoints"
  if not checkpoint_dir.is_dir():
    raise _refuse(key, f"'{workdir}' holds no checkpoints")
  abstract_model = nnx.eval_shape(build_model)
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  optimizer = make_optimizer(cfg.train)
  if trainable is not None:
    optimizer = only_trainable(optimizer, abstract_model, trainable)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params)
  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state)
  checkpointer = Checkpointer(checkpoint_dir, keep=max(int(cfg.checkpoint.keep), 1), async_save=False)
  try:
    restored = checkpointer.restore_latest(abstract_state, set_aside=False)
  except ConfigError as e:
    raise _refuse(key, f"'{workdir}' has no readable checkpoint ({e})") from None
  finally:
    checkpointer.close()
  if restored is None:
    raise _refuse(key, f"'{workdir}' holds no complete checkpoint")
  step, state, _ = restored
  return nnx.merge(graphdef, state["params"]), step


def initial_params(source: str, abstract_params: Any, mesh: jax.sharding.Mesh) -> tuple[Any, str]:
  """(parameters, where from) for a new run's `train.init_from`: a training run's folder (its newest
  checkpoint's parameters, without its optimizer state) or a hub entry, read onto the shardings of
  `abstract_params`; they must be the parameters this config builds (names and shapes)."""
  from common.models import checkpoint_library
  from common.train.checkpoint import CorruptCheckpoint, read_params
  run = run_path(source)
  if (run / "checkpoints").is_dir():
    try:
      step, params = read_params(run / "checkpoints", abstract_params)
    except (ConfigError, CorruptCheckpoint) as e:
      raise _refuse("train.init_from", str(e)) from None
    return params, f"run '{source}' step {step}"
  try:
    _, model, _, _ = checkpoint_library.load(source, mesh=mesh)
  except ConfigError as e:
    raise _refuse("train.init_from", f"'{source}' is neither a run folder with checkpoints nor usable as a hub "
                  f"entry ({e})") from None
  loaded = nnx.split(model, nnx.Param)[1]
  have = {k: v.shape for k, v in nnx.to_flat_state(loaded)}
  want = {k: v.shape for k, v in nnx.to_flat_state(abstract_params)}
  if have != want:
    differ = sorted(set(have) ^ set(want) | {k for k in set(have) & set(want) if have[k] != want[k]}, key=str)
    raise _refuse("train.init_from", f"hub entry '{source}' holds other parameters than this config builds "
                  f"({len(differ)} differ, first {'.'.join(map(str, differ[0]))}); set model.* to its model.json")
  shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
  return jax.device_put(loaded, shardings), f"hub entry '{source}'"
