"""Loss-vs-compute frontiers and what they let us compare.

* The frontier of a family is its best loss at each compute budget (the lower envelope of its IsoFLOP
  curves). We fit L(C) = E + K C^-gamma: the compute scaling law of Kaplan et al. 2020 (eq. 1.3,
  L(C_min) = (C_c / C_min)^alpha_C) plus the irreducible term E of Hoffmann et al. 2022 (eq. 2). With fewer
  than three budgets E is fixed at 0 (a pure power law through the points).
* Compute equivalence: the factor k by which family B needs more compute than family A to reach the loss A
  reaches at C, k(C) = C_B(L_A(C)) / C. Artetxe et al. 2021 (MoE scaling, sec. 4) report exactly this
  ("MoE matches dense with k x less compute").
* The fixed-inference-cost view of the Byte Latent Transformer (Pagnoni et al. 2024, sec. 6/fig. 1): at a
  fixed inference FLOPs-per-byte budget, a larger patch size frees compute for a larger latent model; we
  interpolate each patch size's runs to the budget and compare the losses there.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize

from common.scaling.isoflop import loss_of


@dataclasses.dataclass(frozen=True)
class LossVsCompute:
  """L(C) = E + K * C ** -gamma."""
  E: float
  K: float
  gamma: float

  def loss(self, compute):
    return self.E + self.K * np.asarray(compute, float) ** -self.gamma

  def compute(self, loss):
    """The compute at which the law reaches `loss` (inf at or below E)."""
    excess = np.asarray(loss, float) - self.E
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      return np.where(excess > 0, (self.K / np.maximum(excess, 1e-300)) ** (1 / self.gamma), np.inf)


def frontier(rows: list[dict], *, loss_key: str = "eval_loss", compute_key: str = "flops"):
  """(compute [k], loss [k]): each budget's best run, sorted by budget."""
  best = {}
  for r in rows:
    loss = loss_of(r, loss_key)
    if math.isfinite(loss) and (r["budget"] not in best or loss < best[r["budget"]][1]):
      best[r["budget"]] = (float(r[compute_key]), loss)
  pts = sorted(best.values())
  return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def fit_loss_vs_compute(compute, loss) -> LossVsCompute:
  """Least squares on log L; E in [0, min L). Two points: the power law through them (E = 0)."""
  c, loss = np.asarray(compute, float), np.asarray(loss, float)
  if len(np.unique(c)) < 2:
    raise ValueError("a loss-vs-compute law needs at least two budgets")
  slope, intercept = np.polyfit(np.log(c), np.log(loss), 1)
  if len(np.unique(c)) < 3 or slope >= 0:
    return LossVsCompute(0.0, float(np.exp(intercept)), float(-slope))
  log_c, log_l = np.log(c), np.log(loss)

  def residuals(theta):
    e, log_k, gamma = theta
    return np.log(e + np.exp(log_k - gamma * log_c)) - log_l

  res = optimize.least_squares(residuals, [0.0, intercept, -slope], loss="soft_l1", f_scale=1e-2,
                               bounds=([0.0, -np.inf, 1e-4], [0.999 * loss.min(), np.inf, 5.0]))
  e, log_k, gamma = res.x
  return LossVsCompute(float(e), float(np.exp(log_k)), float(gamma))


def compute_equivalence(rows_a: list[dict], rows_b: list[dict], *, loss_key: str = "eval_loss") -> list[dict]:
  """For each budget on A's frontier: A's loss there, the compute B's law needs for it, and the factor k."""
  fit_b = fit_loss_vs_compute(*frontier(rows_b, loss_key=loss_key))
  out = []
  for c, loss in zip(*frontier(rows_a, loss_key=loss_key)):
    c_b = float(fit_b.compute(loss))
    out.append(dict(compute=float(c), loss=float(loss), compute_b=c_b, factor=c_b / c))
  return out


def fixed_inference_cost(rows: list[dict], budget: float, *, loss_key: str = "loss") -> list[dict]:
  """For each patch size: the model size and loss at `budget` inference FLOPs per byte.

  `rows` carry patch_size, params, inference_flops_per_byte and `loss_key`; each patch size's runs are
  interpolated linearly in log(inference FLOPs per byte) (log params too). Patch sizes whose runs do not
  bracket the budget get NaN rather than an extrapolation. Sorted by loss, best first."""
  out = []
  for p in sorted({r["patch_size"] for r in rows}):
    group = sorted((r for r in rows if r["patch_size"] == p), key=lambda r: r["inference_flops_per_byte"])
    x = np.log([r["inference_flops_per_byte"] for r in group])
    inside = len(group) >= 2 and x[0] <= math.log(budget) <= x[-1]
    loss = np.interp(math.log(budget), x, [r[loss_key] for r in group]) if inside else math.nan
    params = math.exp(np.interp(math.log(budget), x, np.log([r["params"] for r in group]))) if inside else math.nan
    out.append(dict(patch_size=p, params=float(params), loss=float(loss), inference_flops_per_byte=budget))
  return sorted(out, key=lambda r: (not math.isfinite(r["loss"]), r["loss"]))
