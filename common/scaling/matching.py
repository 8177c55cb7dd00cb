"""Compute at equal loss: where a training curve first reaches a target loss, and the compute factor of one
model family over another (the comparisons of Mixture-of-Transformers, Liang et al. 2024, arXiv 2411.04996,
fig. 5: "MoT reaches the dense model's final loss at 55.8% of its FLOPs", and of MoMa, Lin et al. 2024, arXiv
2407.21770, table 2: "FLOPs savings at equal pre-training loss").

Between two eval points the loss is interpolated linearly in log-compute (curves are close to straight there),
so the figure does not jump to the next eval step.
"""
from __future__ import annotations

import math
from typing import Sequence


def x_to_reach(x: Sequence[float], losses: Sequence[float], target: float) -> float:
  """The first x (FLOPs, seconds, ...) at which `losses` reaches `target` (<=), interpolated in log x
  between the last point above and the first point at or below it; NaN if the curve never gets there. A curve
  that starts at or below the target reaches it at its first point."""
  if len(x) != len(losses):
    raise ValueError(f"x and losses differ in length: {len(x)} vs {len(losses)}")
  for i, (xi, li) in enumerate(zip(x, losses)):
    if li <= target:
      if i == 0 or losses[i - 1] == li:
        return float(xi)
      x0, l0 = x[i - 1], losses[i - 1]
      frac = (l0 - target) / (l0 - li)
      if x0 > 0 and xi > 0:
        return float(math.exp(math.log(x0) + frac * (math.log(xi) - math.log(x0))))
      return float(x0 + frac * (xi - x0))
  return math.nan


def fraction_to_reach(base_x: Sequence[float], base_losses: Sequence[float], other_x: Sequence[float],
                      other_losses: Sequence[float]) -> float:
  """The fraction of the baseline's total x (its last point) at which the other curve first reaches the
  baseline's final loss (MoT's "55.8% of the dense FLOPs"); NaN if it never does."""
  return x_to_reach(other_x, other_losses, base_losses[-1]) / base_x[-1]


def compute_factor(base_x: Sequence[float], base_losses: Sequence[float], other_x: Sequence[float],
                   other_losses: Sequence[float]) -> float:
  """How many times more compute the baseline needs for the loss the other model reaches (MoMa's "FLOPs
  savings"). If the other curve reaches the baseline's final loss: baseline total / other's x at that loss
  (>= 1 when the other model is better). Otherwise, at the other's final loss: the baseline's x to reach it /
  the other's total (<= 1)."""
  frac = fraction_to_reach(base_x, base_losses, other_x, other_losses)
  if not math.isnan(frac):
    return 1.0 / frac if frac > 0 else math.inf
  return x_to_reach(base_x, base_losses, other_losses[-1]) / other_x[-1]
