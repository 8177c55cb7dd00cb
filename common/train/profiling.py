"""Where a run's wall time goes: a profiler trace of chosen steps (`log.profile_steps`), goodput (the share of
wall time spent stepping rather than compiling, restoring, evaluating or checkpointing) and hardware FLOPs
utilisation beside the model FLOPs one."""
from __future__ import annotations

import contextlib
import time

import jax

from common.config import ConfigError

# Hardware FLOPs per model FLOP under each remat policy: full remat recomputes every block's forward pass in
# the backward one (forward 2 + backward 4 + forward again 2 per parameter and token: 8/6); dots_saveable
# keeps the matmul outputs, so only cheap elementwise work is redone.
RECOMPUTE = {"none": 1.0, "dots_saveable": 1.0, "full": 4.0 / 3.0}


def parse_window(text: str) -> tuple[int, int] | None:
  """`log.profile_steps` 'N:M' (steps N through M, counted from 1) or '' for none."""
  if not text:
    return None
  try:
    first, last = (int(x) for x in str(text).split(":"))
  except ValueError:
    first = last = 0
  if not 1 <= first <= last:
    raise ConfigError(f"config key 'log.profile_steps': {text!r} is not 'N:M' with 1 <= N <= M")
  return first, last


class StepProfiler:
  """Traces steps first..last with jax.profiler into `log_dir` (TensorBoard's profile plugin reads it)."""

  def __init__(self, window: tuple[int, int] | None, log_dir: str):
    self.window, self.log_dir, self.active = window, log_dir, False

  def before(self, step: int) -> None:
    """Called before step `step` (from 1) runs."""
    if self.window and step == self.window[0] and not self.active:
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """Called after step `step`; waits for its `outputs` so the trace holds the whole step."""
    if self.active and step >= self.window[1]:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      print(f"profile of steps {self.window[0]}..{self.window[1]} written to {self.log_dir}", flush=True)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class Goodput:
  """Wall time since the trainer started, and how much of it went to overheads (`with goodput.overhead():`)."""

  def __init__(self):
    self.start, self.lost = time.time(), 0.0

  @contextlib.contextmanager
  def overhead(self):
    t0 = time.time()
    try:
      yield
    finally:
      self.lost += time.time() - t0

  def fraction(self) -> float:
    elapsed = time.time() - self.start
    return max(0.0, 1.0 - self.lost / elapsed) if elapsed > 0 else 0.0
