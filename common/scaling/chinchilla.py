"""The parametric scaling law L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, "Chinchilla",
sec. 3.3, eq. 2), fitted as in their appendix D.2.

With a = log A, b = log B, e = log E, the predicted log loss is LSE(a - alpha log N, b - beta log D, e), and
the fit minimises sum_i Huber_delta(LSE(...) - log L_i) with delta = 1e-3 by L-BFGS(-B), started from a grid
of initialisations (alpha, beta in {0, .5, ..., 2}, e in {-1, -.5, ..., 1}, a, b in {0, 5, ..., 25}). The
Huber loss on log loss keeps a few outlier runs (a diverged or under-tuned small run) from bending the fit;
fitting in log space weights every run by its relative, not absolute, error. We evaluate the objective on
the whole grid at once and polish only the best `n_starts` grid points, which finds the same optimum for a
fraction of the cost (the grid is what guards against local minima).

The compute-optimal allocation under C = k N D (k = 6 in Kaplan et al. 2020 sec. 2.1 and Chinchilla) is
closed-form (Chinchilla eq. 4 and appendix D.2): N_opt = G (C/k)^(beta/(alpha+beta)),
D_opt = G^-1 (C/k)^(alpha/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)).
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import optimize
from scipy.special import logsumexp

HUBER_DELTA = 1e-3
GRID = dict(alpha=np.arange(0.0, 2.01, 0.5), beta=np.arange(0.0, 2.01, 0.5), e=np.arange(-1.0, 1.01, 0.5),
            a=np.arange(0.0, 25.1, 5.0), b=np.arange(0.0, 25.1, 5.0))
# Exponents away from 0 (a zero exponent makes A or B unidentifiable) and log-coefficients in a wide box.
BOUNDS = [(-20.0, 80.0), (-20.0, 80.0), (-10.0, 5.0), (1e-3, 5.0), (1e-3, 5.0)]  # a, b, e, alpha, beta


@dataclasses.dataclass(frozen=True)
class ChinchillaFit:
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  objective: float  # the Huber objective at the optimum (sum over runs, divided by delta)
  n_runs: int

  def loss(self, n, d):
    """Predicted loss at N parameters and D tokens (arrays broadcast)."""
    n, d = np.asarray(n, float), np.asarray(d, float)
    return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

  def compute_optimal(self, compute, flops_per_param_token: float = 6.0):
    """(N_opt, D_opt) for training FLOPs `compute` under C = k N D (Chinchilla eq. 4)."""
    c = np.asarray(compute, float) / flops_per_param_token
    s = self.alpha + self.beta
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
    return g * c ** (self.beta / s), c ** (self.alpha / s) / g

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
  """Huber objective / delta and its gradient in theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  t1, t2 = a - alpha * log_n, b - beta * log_d
  top = np.maximum(np.maximum(t1, t2), e)
  x1, x2, x3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
  total = x1 + x2 + x3
  r = top + np.log(total) - log_l  # LSE(t1, t2, e) - log L
  abs_r = np.abs(r)
  value = np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta)).sum() / delta
  dr = np.clip(r, -delta, delta) / (delta * total)  # d value / d r, times the softmax denominator
  g1, g2 = dr * x1, dr * x2
  grad = np.array([g1.sum(), g2.sum(), (dr * x3).sum(), -(g1 * log_n).sum(), -(g2 * log_d).sum()])
  return value, grad


def _grid_objectives(log_n, log_d, log_l, delta) -> tuple[np.ndarray, np.ndarray]:
  """All grid points [P, 5] and their objective values [P], vectorised over the grid."""
  grid = np.array(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])))
  a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
  r = logsumexp(terms, axis=0) - log_l
  values = np.where(np.abs(r) <= delta, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)).sum(1) / delta
  return grid, values


def fit_chinchilla(n, d, loss, *, delta: float = HUBER_DELTA, n_starts: int = 8) -> ChinchillaFit:
  """Fits E, A, B, alpha, beta to runs with N parameters, D tokens and final loss L (1-D arrays)."""
  n, d, loss = (np.asarray(x, float).ravel() for x in (n, d, loss))
  keep = np.isfinite(n) & np.isfinite(d) & np.isfinite(loss) & (loss > 0)
  if keep.sum() < 5:
    raise ValueError(f"the Chinchilla law has 5 parameters; got {int(keep.sum())} usable runs")
  log_n, log_d, log_l = np.log(n[keep]), np.log(d[keep]), np.log(loss[keep])
  grid, values = _grid_objectives(log_n, log_d, log_l, delta)
  starts = grid[np.argsort(values)[:n_starts]]
  best = None
  for theta0 in starts:
    theta0 = np.clip(theta0, [lo for lo, _ in BOUNDS], [hi for _, hi in BOUNDS])
    res = optimize.minimize(_objective, theta0, args=(log_n, log_d, log_l, delta), jac=True,
                            method="L-BFGS-B", bounds=BOUNDS,
                            options=dict(maxiter=5000, ftol=1e-15, gtol=1e-12))
    if best is None or res.fun < best.fun:
      best = res
  a, b, e, alpha, beta = best.x
  return ChinchillaFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                       beta=float(beta), objective=float(best.fun), n_runs=int(keep.sum()))


def fit_rows(rows: list[dict], *, loss_key: str = "eval_loss", param_key: str = "params_total",
             **kwargs) -> ChinchillaFit:
  """`fit_chinchilla` on the rows of a results table (results.py)."""
  return fit_chinchilla([r[param_key] for r in rows], [r["tokens"] for r in rows],
                        [r[loss_key] for r in rows], **kwargs)
