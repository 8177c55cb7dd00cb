"""Percentile bootstrap confidence intervals over runs (Efron & Tibshirani 1993, ch. 13).

Hoffmann et al. 2022 (Chinchilla, table 2, appendix D) bootstrap their fits over training runs; so do we:
resample the rows of a results table with replacement, refit, and take percentiles of each fitted quantity.
With `group`, rows are resampled within each group (e.g. within each IsoFLOP budget), so that every
resample still has every budget. Resamples whose fit fails (too few distinct sizes, a concave parabola)
are skipped and counted.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def resample(rows: list[dict], rng: np.random.Generator, group: str | None = None) -> list[dict]:
  if group is None:
    return [rows[i] for i in rng.integers(0, len(rows), len(rows))]
  out = []
  for key in sorted({r[group] for r in rows}):
    members = [r for r in rows if r[group] == key]
    out += [members[i] for i in rng.integers(0, len(members), len(members))]
  return out


def bootstrap(rows: list[dict], statistic: Callable[[list[dict]], dict[str, float]], *, n: int = 200,
              level: float = 0.95, seed: int = 0, group: str | None = None) -> dict[str, dict]:
  """{name: {'low', 'high', 'median', 'n'}} for each number `statistic(rows)` returns."""
  rng = np.random.default_rng(seed)
  samples: dict[str, list[float]] = {}
  for _ in range(n):
    try:
      values = statistic(resample(rows, rng, group))
    except (ValueError, np.linalg.LinAlgError, FloatingPointError):
      continue
    for k, v in values.items():
      samples.setdefault(k, []).append(float(v))
  tail = 100 * (1 - level) / 2
  out = {}
  for k, v in samples.items():
    v = np.asarray(v)
    v = v[np.isfinite(v)]
    if len(v):
      out[k] = dict(low=float(np.percentile(v, tail)), high=float(np.percentile(v, 100 - tail)),
                    median=float(np.median(v)), n=int(len(v)))
  return out
