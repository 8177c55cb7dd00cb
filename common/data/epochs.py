"""The row order every batch source shares: an endless stream of epochs, each a permutation of the rows fixed
by (seed, epoch), so that the rows at a data position are a pure function of it (resume = no history)."""
from __future__ import annotations

import numpy as np


class EpochOrder:
  """Row indices at any position of the stream (`stream`: one of several independent orders, e.g. one per data
  shard); keeps the permutations of the last two epochs it used (a
  batch touches at most a few epochs), so memory stays O(rows)."""

  def __init__(self, num_rows: int, seed: int, stream: int | None = None):
    self.num_rows, self.seed, self.stream = int(num_rows), int(seed), stream
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:
        self._perms.pop(min(self._perms))
      key = (self.seed % 2**63, epoch) if self.stream is None else (self.seed % 2**63, epoch, self.stream)
      self._perms[epoch] = np.random.default_rng(key).permutation(self.num_rows)
    return self._perms[epoch]

  def rows_at(self, position: int, count: int) -> np.ndarray:
    """Indices of rows position .. position+count-1 of the stream."""
    if position < 0:
      raise ValueError(f"data position must be >= 0, got {position}")
    epochs, offsets = np.divmod(np.arange(position, position + count, dtype=np.int64), self.num_rows)
    rows = np.empty(count, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      rows[sel] = self._perm(int(epoch))[offsets[sel]]
    return rows
