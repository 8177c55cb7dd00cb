"""Orbax checkpoints of the whole training state plus a JSON record (step, data position).

Saves are asynchronous; `wait()` blocks until the last one is on disk. Restores go onto whatever shardings
the caller's abstract state carries, so a checkpoint written on one mesh loads on any other. A step folder
that cannot be read is set aside (renamed, never deleted) and the previous one is used instead.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from common.config import ConfigError

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))

  def restore_latest(self, abstract_state: Any, *, set_aside: bool = True) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest readable checkpoint, or None if there is none at all. Newer unreadable
    ones are set aside (`set_aside`, the trainer's resume) or only skipped (readers of another run)."""
    steps = self.steps()
    unreadable = []
    for step in reversed(steps):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as e:  # any failure to read means: not usable
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        print(f"checkpoint step {step} in {self.directory} is unreadable ({reason}); trying an older one",
              flush=True)
        unreadable.append(step)
        continue
      for bad in unreadable if set_aside else ():
        self._set_aside(bad)
      return step, out["state"], dict(out["meta"])
    if steps:
      raise ConfigError(f"no readable checkpoint in '{self.directory}' (steps {steps} all failed to restore); "
                        "move them away to start afresh")
    return None

  def _set_aside(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0 and os.path.isdir(src):
      os.rename(src, dst)
      print(f"set the unreadable checkpoint aside as {dst}", flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
