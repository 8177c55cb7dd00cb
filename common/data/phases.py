"""A data schedule: training in phases, each phase its own packed rows and its own number of steps.

Curricula (pre-instruction-tuning's QA-then-documents orders, instruction-tuning task stages) are schedules:
step p of the run takes its batch from the phase whose steps contain p, in that phase's own epoch order
(`common.data.epochs.EpochOrder`, seeded by (seed, phase index)). A batch is a pure function of (seed,
position), so the common loop resumes a schedule mid-phase exactly, and the phases' rows are whatever the
caller packed (`common.data.sft.pack_examples`), with the keys of `common.data.LMData`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from common.data import DataError
from common.data.epochs import EpochOrder


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  rows: dict  # packed rows: inputs, targets, segment_ids, positions [n, seq_len] int32; loss_mask f32
  steps: int

  @property
  def num_rows(self) -> int:
    return int(self.rows["targets"].shape[0])


def steps_for_epochs(num_rows: int, epochs: float, batch_size: int) -> int:
  """Steps that show `num_rows` rows `epochs` times at `batch_size` rows a step (at least one)."""
  return max(1, math.ceil(num_rows * epochs / batch_size))


class PhasedData:
  """Batches of a schedule of phases (the interface of `common.data.sft.SFTData`: `train_batch(position)`,
  `eval_batches(n)`, `seq_len`, `num_train_rows`, `num_eval_rows`). Position p is step p // batch_size; past
  the last phase's steps the last phase continues."""

  def __init__(self, phases: list[Phase], eval_rows: dict[str, np.ndarray], *, batch_size: int, seed: int):
    if not phases:
      raise DataError("a data schedule needs at least one phase")
    for phase in phases:
      if phase.num_rows == 0:
        raise DataError(f"phase '{phase.name}' of the data schedule has no rows")
      if phase.steps < 1:
        raise DataError(f"phase '{phase.name}' of the data schedule has {phase.steps} steps (needs >= 1)")
    widths = {int(p.rows["targets"].shape[1]) for p in phases} | {int(eval_rows["targets"].shape[1])}
    if len(widths) != 1:
      raise DataError(f"the phases' rows have different lengths {sorted(widths)}")
    self.phases, self.batch_size, self.seed = list(phases), int(batch_size), int(seed)
    self.seq_len = widths.pop()
    self._eval = eval_rows
    self.num_eval_rows = int(eval_rows["targets"].shape[0])
    self.num_train_rows = sum(p.num_rows for p in phases)
    self.starts = np.cumsum([0] + [p.steps for p in phases[:-1]]).tolist()  # first step of each phase
    self.total_steps = sum(p.steps for p in phases)
    self._orders = [EpochOrder(p.num_rows, _phase_seed(self.seed, i)) for i, p in enumerate(phases)]

  def phase_at(self, step: int) -> int:
    """Index of the phase that step `step` (0-based) trains on."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    return int(np.searchsorted(self.starts, step, side="right")) - 1

  def train_batch(self, position: int) -> dict[str, np.ndarray]:
    step = position // self.batch_size
    index = self.phase_at(step)
    offset = position - self.starts[index] * self.batch_size  # the phase's own data position
    rows = self._orders[index].rows_at(offset, self.batch_size)
    return {k: v[rows] for k, v in self.phases[index].rows.items()}

  def eval_batches(self, max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Held-out rows in order, the last batch padded with empty rows (loss_mask 0); max_batches <= 0: all."""
    n = math.ceil(self.num_eval_rows / self.batch_size)
    if max_batches > 0:
      n = min(n, max_batches)
    short = max(n * self.batch_size - self.num_eval_rows, 0)
    padded = {k: np.concatenate([v, np.zeros((short, self.seq_len), v.dtype)]) for k, v in self._eval.items()}
    for b in range(n):
      yield {k: v[b * self.batch_size:(b + 1) * self.batch_size] for k, v in padded.items()}


def _phase_seed(seed: int, index: int) -> int:
  """A phase's epoch-order seed: distinct per phase, so two phases of equal size do not repeat an order."""
  return (int(seed) * 1_000_003 + index) % 2**63
