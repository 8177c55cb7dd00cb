"""IsoFLOP profiles: the loss-minimising model size per compute budget (Hoffmann et al. 2022, "Chinchilla",
sec. 3.2, approach 2).

For each budget C the runs lie on an IsoFLOP curve; we fit a parabola to loss against log N, take its vertex
as N_opt(C), read D_opt(C) off the same curve (the runs' log D is linear in log N at fixed C, whatever the
FLOP count per token), and fit the power laws N_opt = k_N C^a and D_opt = k_D C^b by least squares in
log-log space (Chinchilla table 2 reports a ~ b ~ 0.5). Kaplan et al. 2020 (sec. 6.1) fit the same frontier
to the lower envelope of learning curves instead.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = coefficient * x ** exponent."""
  exponent: float
  coefficient: float

  def __call__(self, x):
    return self.coefficient * np.asarray(x, float) ** self.exponent


@dataclasses.dataclass(frozen=True)
class IsoFlopMinimum:
  budget: float
  n_opt: float
  d_opt: float
  loss_opt: float
  parabola: tuple[float, float, float]  # loss = p0 x^2 + p1 x + p2, x = log10 N
  inside: bool  # the vertex lies within the sizes trained at this budget (else: extrapolated)


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
  minima: list[IsoFlopMinimum]
  n_opt: PowerLaw
  d_opt: PowerLaw
  skipped: list[str]  # budgets without a minimum, and why


def loss_of(row: dict, loss_key: str) -> float:
  """The row's `loss_key`, falling back to the train loss where the eval loss is missing."""
  v = row.get(loss_key, math.nan)
  return float(row["train_loss"]) if (v is None or not math.isfinite(v)) and "train_loss" in row else float(v)


def fit_power_law(x, y) -> PowerLaw:
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 2 or len(np.unique(x)) < 2:
    raise ValueError(f"a power law needs at least two distinct x values, got {len(np.unique(x))}")
  slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
  return PowerLaw(float(slope), float(np.exp(intercept)))


def isoflop_minimum(budget: float, n, d, loss) -> IsoFlopMinimum:
  """The vertex of the parabola loss(log10 N) through one budget's runs (at least three sizes)."""
  x, log_d, loss = np.log10(np.asarray(n, float)), np.log10(np.asarray(d, float)), np.asarray(loss, float)
  if len(np.unique(x)) < 3:
    raise ValueError(f"C={budget:.3g}: a parabola needs at least three sizes, got {len(np.unique(x))}")
  p = np.polyfit(x, loss, 2)
  if p[0] <= 0:
    raise ValueError(f"C={budget:.3g}: loss vs log N is not convex (no minimum inside the curve)")
  x_opt = -p[1] / (2 * p[0])
  d_slope, d_intercept = np.polyfit(x, log_d, 1)
  return IsoFlopMinimum(budget=float(budget), n_opt=float(10 ** x_opt),
                        d_opt=float(10 ** (d_slope * x_opt + d_intercept)),
                        loss_opt=float(np.polyval(p, x_opt)), parabola=tuple(float(c) for c in p),
                        inside=bool(x.min() <= x_opt <= x.max()))


def isoflop_minima(rows: list[dict], *, loss_key: str = "eval_loss",
                   param_key: str = "params_total") -> tuple[list[IsoFlopMinimum], list[str]]:
  """The minimum of every budget whose runs give a convex parabola, and why the other budgets have none."""
  minima, skipped = [], []
  for budget in sorted({r["budget"] for r in rows}):
    group = [r for r in rows if r["budget"] == budget and math.isfinite(loss_of(r, loss_key))]
    try:
      minima.append(isoflop_minimum(budget, [r[param_key] for r in group], [r["tokens"] for r in group],
                                    [loss_of(r, loss_key) for r in group]))
    except ValueError as e:
      skipped.append(str(e))
  return minima, skipped


def fit_isoflop(rows: list[dict], *, loss_key: str = "eval_loss", param_key: str = "params_total") -> IsoFlopFit:
  """IsoFLOP minima and the N_opt(C), D_opt(C) power laws through them (at least two budgets with one)."""
  minima, skipped = isoflop_minima(rows, loss_key=loss_key, param_key=param_key)
  if len(minima) < 2:
    raise ValueError(f"N_opt(C) needs IsoFLOP minima at two or more budgets; got {len(minima)}" +
                     (f" ({'; '.join(skipped)})" if skipped else ""))
  budgets = [m.budget for m in minima]
  return IsoFlopFit(minima, fit_power_law(budgets, [m.n_opt for m in minima]),
                    fit_power_law(budgets, [m.d_opt for m in minima]), skipped)


def exponents(rows: list[dict], **kwargs) -> dict[str, float]:
  """The numbers to bootstrap: exponents a, b and coefficients of N_opt(C), D_opt(C)."""
  fit = fit_isoflop(rows, **kwargs)
  return dict(n_opt_exponent=fit.n_opt.exponent, n_opt_coefficient=fit.n_opt.coefficient,
              d_opt_exponent=fit.d_opt.exponent, d_opt_coefficient=fit.d_opt.coefficient)
