"""Orbax checkpoints of the whole training state plus a JSON record (step, data position, array checksums).

Saves are asynchronous; `wait()` blocks until the last one is on disk. Restores go onto whatever shardings
the caller's abstract state carries, so a checkpoint written on one mesh loads on any other.

Only evidence of corruption sets a checkpoint aside (renamed, never deleted; the previous one is used): a
checksum that no longer matches, or a read that fails decoding the files. Anything else (an I/O error, out of
memory) is raised as it is and leaves the checkpoint alone, since the next attempt may well read it. A
checkpoint whose tree is not this run's training state (the optimizer or model changed) is refused as such.
Process 0 decides and every process follows its verdict, so all of them resume from the same step.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from common.config import ConfigError
from common.train.workdir import run_path

# Status codes of TensorStore errors that say the bytes are wrong, not that reading them failed for now.
CORRUPT_STATUS = ("DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE", "INVALID_ARGUMENT", "NOT_FOUND")
OK, CORRUPT, FAILED = 0, 1, 2
# Scalars of the training state newer than some checkpoints (common.train.step.init_state); a checkpoint
# without one restores it as zero.
ADDED_SINCE = ("skipped_steps",)


class CorruptCheckpoint(ValueError):
  """The bytes of a checkpoint are not the ones saved."""


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of every element as uint32 (8-byte elements fold their two words)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = np.dtype(x.dtype).itemsize
  if width == 8:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return words[..., 0] ^ (words[..., 1] * jnp.uint32(0x9E3779B1))
  return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]).astype(jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
  """Two uint32 words: sums mod 2**32 of each element's bits times an odd weight of its flat index. Integer
  sums do not depend on the order of addition, so the value is the same on every mesh (and is reduced where
  the shards live, never gathered); flipping any one bit changes the first word."""
  bits = _as_uint32(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  for dim in range(bits.ndim):
    stride = math.prod(bits.shape[dim + 1:])
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride % 2 ** 32)
  first = jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
  mixed = (bits ^ (bits >> 16)) * jnp.uint32(0x45D9F3B)
  second = jnp.sum(mixed * ((index * jnp.uint32(0x9E3779B1)) | 1), dtype=jnp.uint32)
  return jnp.stack([first, second])


def _names(tree: Any) -> dict[str, Any]:
  """{orbax's name of each array ('params.embed.embedding.value'): array}."""
  return ocp.tree.to_flat_dict(tree, sep=".")


_checksums = jax.jit(lambda arrays: {name: _array_checksum(x) for name, x in arrays.items()})


def state_checksums(state: Any) -> dict[str, str]:
  """{array name: 16 hex digits} of a (sharded) state, computed on the devices."""
  words = jax.device_get(_checksums(_names(state)))
  return {k: f"{int(w[0]):08x}{int(w[1]):08x}" for k, w in words.items()}


def _status(e: BaseException) -> int:
  """CORRUPT when the exception (or one it came from) shows bytes that do not decode; FAILED otherwise."""
  seen = e
  while seen is not None:
    if isinstance(seen, CorruptCheckpoint):
      return CORRUPT
    if isinstance(seen, (OSError, MemoryError)):
      return FAILED
    if isinstance(seen, (json.JSONDecodeError, UnicodeDecodeError)):
      return CORRUPT  # a record (orbax's metadata, ours) that does not parse
    if isinstance(seen, ValueError) and str(seen).lstrip().startswith(CORRUPT_STATUS):
      return CORRUPT  # TensorStore could read the bytes but not decode them
    seen = seen.__cause__ or seen.__context__
  return FAILED


def _agree(value: int) -> int:
  """Process 0's value on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


class Checkpointer:

  def __init__(self, directory, *, keep: int, async_save: bool = True):
    """`directory`: a local path or any epath URL (gs://...), which orbax writes to itself."""
    self.directory = run_path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves `state` and the record `meta` with the checksum of every array added."""
    if step in self.manager.all_steps():
      return
    meta = {**meta, "checksums": state_checksums(state)}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))

  def _check_tree(self, step: int, abstract_state: Any) -> set[str]:
    """The keys of ADDED_SINCE that checkpoint `step` lacks; a ConfigError when it holds arrays of other
    names or shapes than `abstract_state` otherwise."""
    metadata = self.manager.item_metadata(step)["state"]
    saved = {name: tuple(m.shape) for name, m in _names(getattr(metadata, "tree", metadata)).items()
             if hasattr(m, "shape")}
    wanted = {name: tuple(x.shape) for name, x in _names(abstract_state).items()}
    absent = {k for k in ADDED_SINCE if k in wanted and k not in saved}
    wanted = {k: v for k, v in wanted.items() if k not in absent}
    if saved == wanted:
      return absent
    only_saved = sorted(set(saved) - set(wanted))
    only_wanted = sorted(set(wanted) - set(saved))
    reshaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    detail = "; ".join(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for what, names in (
        ("only in the checkpoint", only_saved), ("only in this run", only_wanted),
        ("shape changed", reshaped)) if names)
    raise ConfigError(f"checkpoint step {step} in '{self.directory}' is intact but holds another training state "
                      f"than this config builds ({detail}); the model or optimizer settings changed since it "
                      "was saved: restore them, or use another workdir")

  def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    meta = dict(out["meta"])
    recorded = meta.pop("checksums", None)
    if recorded is not None:
      actual = state_checksums(out["state"])
      bad = sorted(k for k in recorded if actual.get(k) != recorded[k])
      if bad:
        raise CorruptCheckpoint(f"checksum mismatch in {len(bad)} array(s), first '{bad[0]}'")
    return out["state"], meta

  def restore_latest(self, abstract_state: Any, *, set_aside: bool = True) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest intact checkpoint, or None if there is none at all. Newer corrupt
    ones are set aside (`set_aside`, the trainer's resume) or only skipped (readers of another run)."""
    steps = self.steps()
    corrupt = []
    for step in reversed(steps):
      error, verdict, state, meta = None, OK, None, None
      try:
        absent = self._check_tree(step, abstract_state)
        state, meta = self._restore(step, {k: v for k, v in abstract_state.items() if k not in absent})
        for key in absent:
          state[key] = jax.device_put(np.zeros(abstract_state[key].shape, abstract_state[key].dtype),
                                      abstract_state[key].sharding)
      except ConfigError:
        raise
      except Exception as e:  # judged below: only evidence of corruption skips a checkpoint
        error, verdict = e, _status(e)
      verdict = _agree(verdict)
      if verdict == FAILED:
        if error is None:
          raise RuntimeError(f"process 0 failed to read checkpoint step {step} in '{self.directory}'")
        raise error
      if verdict == OK and error is not None:  # process 0 read it; this one did not
        raise error
      if verdict == CORRUPT:
        reason = str(error).splitlines()[0][:200] if error is not None and str(error) else "on process 0"
        print(f"checkpoint step {step} in {self.directory} is corrupt ({reason}); trying an older one",
              flush=True)
        corrupt.append(step)
        continue
      for bad in corrupt if set_aside else ():
        self._set_aside(bad)
      return step, state, meta
    if steps:
      raise ConfigError(f"no intact checkpoint in '{self.directory}' (steps {steps} are all corrupt); "
                        "move them away to start afresh")
    return None

  def _set_aside(self, step: int) -> None:
    src = self.directory / str(step)
    dst = src.with_name(f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0 and src.is_dir():
      src.rename(dst)
      print(f"set the corrupt checkpoint aside as {dst}", flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_params(directory, abstract_params: Any) -> tuple[int, Any]:
  """(step, parameters) of the newest checkpoint of another run that holds `abstract_params`' names and shapes,
  read onto their shardings without the optimizer state (orbax's partial restore) and checked against the
  recorded checksums. Raises ConfigError when the run has none, or when its parameters are other ones."""
  directory = run_path(directory)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                 "meta": ocp.JsonCheckpointHandler()})
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise ConfigError(f"'{directory}' holds no checkpoint")
    step = steps[-1]
    metadata = manager.item_metadata(step)["state"]
    saved = {name: tuple(m.shape) for name, m in _names(getattr(metadata, "tree", metadata)).items()
             if name.startswith("params.") and hasattr(m, "shape")}
    wanted = {f"params.{name}": tuple(x.shape) for name, x in _names(abstract_params).items()}
    if saved != wanted:
      differ = sorted(set(saved) ^ set(wanted) | {k for k in set(saved) & set(wanted) if saved[k] != wanted[k]})
      raise ConfigError(f"checkpoint step {step} in '{directory}' holds other parameters than this config builds "
                        f"({len(differ)} differ, first '{differ[0]}')")
    item = {"params": abstract_params}
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                     partial_restore=True),
        meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  recorded = out["meta"].get("checksums", {})
  actual = state_checksums(out["state"])
  bad = sorted(k for k in actual if k in recorded and recorded[k] != actual[k])
  if bad:
    raise CorruptCheckpoint(f"checkpoint step {step} in '{directory}': checksum mismatch in '{bad[0]}'")
  return step, out["state"]["params"]
