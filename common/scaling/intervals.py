"""Mean and Student-t confidence interval of a figure repeated over seeds.

Reproductions report each figure (a loss, a compute factor) as the mean over N seeds with a 95% interval
mean ± t_{(1+level)/2, N-1} s / sqrt(N), s the sample standard deviation (Student 1908; any statistics text).
With one seed there is no spread to estimate, so the half-width is NaN and tables print it as such.
"""
from __future__ import annotations

import math
from typing import Sequence


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """(mean, half-width) of the `level` t-interval of `values`; half-width NaN for fewer than two values."""
  import numpy as np
  from scipy import stats
  x = np.asarray(values, dtype=float)
  if x.size == 0:
    raise ValueError("t_interval needs at least one value")
  if x.size == 1:
    return float(x[0]), math.nan
  half = stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
  return float(x.mean()), float(half)
