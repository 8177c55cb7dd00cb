"""Sampling rates of a multi-task mixture: how often each task's examples appear in the training stream.

Three rules, as instruction-tuning and multi-task papers state them:
- examples-proportional with a per-task cap K (Raffel et al. 2020, sec. 3.5.2): r_i = min(n_i, K) / sum_j
  min(n_j, K), so that a huge task cannot drown the others;
- temperature T (Raffel et al. 2020; Arivazhagan et al. 2019): r_i proportional to min(n_i, K)^(1/T); T = 1 is
  examples-proportional, T -> infinity uniform over tasks;
- fixed proportions over groups (benchmarks, as OPT-IML Bench mixes its source benchmarks, Iyer et al. 2022,
  sec. 3.3): group g gets weight w_g (renormalised over the groups that have tasks) and shares it among its
  tasks by one of the rules above.

`sample_counts` turns rates into a concrete number of examples per task for a stream of a given length.
Everything is numpy on lists of sizes and names, so the rules do not depend on how tasks are stored.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from common.data import DataError


def capped_sizes(sizes: Sequence[int], cap: int = 0) -> np.ndarray:
  """min(n_i, cap) as floats; cap <= 0 means no cap."""
  n = np.asarray(sizes, np.float64)
  if n.ndim != 1 or (n < 0).any():
    raise DataError(f"mixture: task sizes must be a list of counts >= 0, got {list(sizes)}")
  return np.minimum(n, cap) if cap > 0 else n


def examples_proportional(sizes: Sequence[int], cap: int = 0) -> np.ndarray:
  """r_i = min(n_i, cap) / sum_j min(n_j, cap)."""
  return temperature_rates(sizes, 1.0, cap)


def temperature_rates(sizes: Sequence[int], temperature: float, cap: int = 0) -> np.ndarray:
  """r_i proportional to min(n_i, cap)^(1/temperature); temperature > 0."""
  if not temperature > 0:
    raise DataError(f"mixture: the temperature must be > 0, got {temperature}")
  n = capped_sizes(sizes, cap)
  if n.sum() <= 0:
    raise DataError("mixture: every task is empty")
  weights = np.where(n > 0, n ** (1.0 / temperature), 0.0)
  return weights / weights.sum()


def group_proportions(groups: Sequence[str], proportions: Mapping[str, float],
                      within: np.ndarray) -> np.ndarray:
  """Rates when group g (a task's benchmark) gets `proportions[g]` of the stream, shared among its tasks in
  proportion to `within` (rates computed over all tasks; only their ratios inside a group matter). Groups
  without tasks drop out and the others are renormalised; a task of a group with no proportion is an error."""
  within = np.asarray(within, np.float64)
  if len(groups) != len(within):
    raise DataError(f"mixture: {len(groups)} groups for {len(within)} tasks")
  unknown = sorted({g for g in groups if g not in proportions})
  if unknown:
    raise DataError(f"mixture: no proportion for group '{unknown[0]}' (given: {', '.join(sorted(proportions))})")
  bad = [g for g, w in proportions.items() if w < 0]
  if bad:
    raise DataError(f"mixture: the proportion of group '{bad[0]}' is negative")
  present = sorted(set(groups))
  total = sum(float(proportions[g]) for g in present)
  if total <= 0:
    raise DataError(f"mixture: the groups with tasks ({', '.join(present)}) all have proportion 0")
  rates = np.zeros(len(groups))
  for g in present:
    members = np.array([x == g for x in groups])
    mass = within[members].sum()
    if mass > 0:
      rates[members] = float(proportions[g]) / total * within[members] / mass
  return rates / rates.sum()


def sample_counts(rates: Sequence[float], total: int) -> np.ndarray:
  """Examples per task in a stream of `total`: floor(r_i * total) plus one for the largest remainders, so the
  counts sum to `total` exactly and follow the rates to within one example (no sampling noise)."""
  r = np.asarray(rates, np.float64)
  if r.ndim != 1 or (r < 0).any() or not np.isclose(r.sum(), 1.0):
    raise DataError(f"mixture: rates must be >= 0 and sum to 1, got sum {r.sum():.6f}")
  exact = r * int(total)
  counts = np.floor(exact).astype(np.int64)
  short = int(total) - int(counts.sum())
  if short > 0:
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
  return counts
