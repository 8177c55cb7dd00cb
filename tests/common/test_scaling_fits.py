"""Scaling-law fits on synthetic data drawn from known laws (no training): the Chinchilla parametric fit,
IsoFLOP minima and their power laws, bootstrap intervals, compute equivalence, the fixed-inference view."""
import math
import os

import numpy as np
import pytest

from common.scaling import bootstrap, chinchilla, frontier, isoflop

# Hoffmann et al. 2022, eq. 10 (their fitted law), used as the ground truth.
TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def law(n, d):
  return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def noisy(loss, rng, sigma=0.002):
  return loss * np.exp(rng.normal(0.0, sigma, np.shape(loss)))


def test_chinchilla_fit_recovers_known_parameters_within_5_percent():
  """A grid of N (1e7..1e10) x D (1e8..1e12) with 0.2% multiplicative noise: every one of E, A, B, alpha and
  beta within 5%. The grid spans both terms' ranges, which is what makes A and B (fitted as log A, log B)
  identifiable; on an IsoFLOP-only grid they trade off against the exponents."""
  rng = np.random.default_rng(0)
  n, d = (x.ravel() for x in np.meshgrid(np.logspace(7, 10, 8), np.logspace(8, 12, 8)))
  fit = chinchilla.fit_chinchilla(n, d, noisy(law(n, d), rng))
  for key, true in TRUE.items():
    assert getattr(fit, key) == pytest.approx(true, rel=0.05), key


def test_chinchilla_fit_is_robust_to_an_outlier_run():
  """The Huber loss on log loss: one run 30% off (a diverged run) barely moves the exponents."""
  rng = np.random.default_rng(1)
  n, d = (x.ravel() for x in np.meshgrid(np.logspace(7, 10, 6), np.logspace(8, 12, 6)))
  loss = noisy(law(n, d), rng)
  loss[5] *= 1.3
  fit = chinchilla.fit_chinchilla(n, d, loss)
  assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.05)
  assert fit.beta == pytest.approx(TRUE["beta"], rel=0.05)


def test_compute_optimal_allocation_spends_the_budget():
  fit = chinchilla.ChinchillaFit(**TRUE, objective=0.0, n_runs=0)
  n_opt, d_opt = fit.compute_optimal(np.array([1e20, 1e22]))
  assert 6 * n_opt * d_opt == pytest.approx([1e20, 1e22], rel=1e-9)
  assert fit.loss(n_opt, d_opt)[0] < fit.loss(n_opt[0] * 2, d_opt[0] / 2)


def isoflop_rows(budgets, rng, points=7, half_width=0.6, sigma=0.001):
  """Runs on IsoFLOP curves C = 6ND of the true law, sizes spread +-half_width decades around the optimum."""
  truth = chinchilla.ChinchillaFit(**TRUE, objective=0.0, n_runs=0)
  rows = []
  for c in budgets:
    n_star = float(truth.compute_optimal(c)[0])
    for n in n_star * np.logspace(-half_width, half_width, points):
      d = c / (6 * n)
      rows.append(dict(family="synthetic", size=int(n), budget=c, flops=c, params_total=n, tokens=d,
                       eval_loss=float(noisy(law(n, d), rng, sigma)), train_loss=math.nan))
  return rows, truth


def test_isoflop_minima_recover_the_compute_optimal_frontier():
  """Parabola vertices land within 5% of the true N_opt(C); the fitted exponents within 5% of
  beta/(alpha+beta) and alpha/(alpha+beta) (Chinchilla eq. 4)."""
  budgets = [1e18, 1e19, 1e20, 1e21, 1e22]
  rows, truth = isoflop_rows(budgets, np.random.default_rng(2))
  fit = isoflop.fit_isoflop(rows)
  for m in fit.minima:
    n_true, d_true = truth.compute_optimal(m.budget)
    assert m.n_opt == pytest.approx(n_true, rel=0.05)
    assert m.d_opt == pytest.approx(d_true, rel=0.05)
    assert m.inside
  s = TRUE["alpha"] + TRUE["beta"]
  assert fit.n_opt.exponent == pytest.approx(TRUE["beta"] / s, rel=0.05)
  assert fit.d_opt.exponent == pytest.approx(TRUE["alpha"] / s, rel=0.05)


def test_isoflop_refuses_a_budget_with_fewer_than_three_sizes():
  rows, _ = isoflop_rows([1e18, 1e19, 1e20], np.random.default_rng(3))
  rows = [r for r in rows if r["budget"] != 1e18 or r["size"] == rows[0]["size"]]
  fit = isoflop.fit_isoflop(rows)
  assert [m.budget for m in fit.minima] == [1e19, 1e20]
  assert "three sizes" in fit.skipped[0]


def test_bootstrap_interval_of_the_n_opt_exponent_covers_the_truth():
  rows, _ = isoflop_rows([1e18, 1e19, 1e20, 1e21], np.random.default_rng(4), sigma=0.003)
  ci = bootstrap.bootstrap(rows, isoflop.exponents, n=100, group="budget", seed=1)
  true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
  band = ci["n_opt_exponent"]
  assert band["low"] <= band["median"] <= band["high"]
  assert band["low"] - 0.02 <= true <= band["high"] + 0.02
  assert band["n"] >= 90


def frontier_rows(family, loss_of_compute, budgets):
  return [dict(family=family, size=1, budget=c, flops=c, eval_loss=float(loss_of_compute(c))) for c in budgets]


def test_compute_equivalence_recovers_a_constant_factor():
  """Family B needs exactly k = 4x the compute of family A for any loss: k is recovered at every budget."""
  law_a = frontier.LossVsCompute(E=1.5, K=300.0, gamma=0.15)
  budgets = np.logspace(15, 19, 6)
  rows_a = frontier_rows("moe", law_a.loss, budgets)
  rows_b = frontier_rows("dense", lambda c: law_a.loss(c / 4.0), budgets)
  factors = [e["factor"] for e in frontier.compute_equivalence(rows_a, rows_b)]
  assert factors == pytest.approx([4.0] * len(budgets), rel=0.02)


def test_loss_vs_compute_fit_recovers_the_law():
  true = frontier.LossVsCompute(E=1.2, K=80.0, gamma=0.2)
  c = np.logspace(14, 20, 8)
  fit = frontier.fit_loss_vs_compute(c, true.loss(c))
  assert fit.loss(c) == pytest.approx(true.loss(c), rel=1e-3)
  assert fit.compute(true.loss(1e17)) == pytest.approx(1e17, rel=0.02)


def test_fixed_inference_cost_compares_patch_sizes_at_equal_inference_flops():
  """Bigger patches buy a bigger model at the same inference FLOPs per byte; the helper reads each patch
  size's loss at the budget and ranks them (here patch 8 wins by construction)."""
  rows = []
  for patch, offset in ((4, 0.10), (6, 0.05), (8, 0.0)):
    for params in (1e8, 4e8, 1.6e9):
      flops_per_byte = 2 * params / patch
      rows.append(dict(patch_size=patch, params=params, inference_flops_per_byte=flops_per_byte,
                       loss=1.0 + offset + 5 / math.log(flops_per_byte)))
  out = frontier.fixed_inference_cost(rows, budget=1e8)
  assert [r["patch_size"] for r in out] == [8, 6, 4]
  assert out[0]["params"] == pytest.approx(4e8, rel=1e-6)  # 2 * 4e8 / 8 = 1e8 FLOPs per byte
  outside = frontier.fixed_inference_cost(rows, budget=1e12)
  assert all(math.isnan(r["loss"]) for r in outside)


def test_comparison_and_fixed_inference_plots_are_written(tmp_path):
  from common.scaling import plots
  law_a = frontier.LossVsCompute(E=1.5, K=300.0, gamma=0.15)
  budgets = np.logspace(15, 19, 4)
  rows_a = frontier_rows("moe", law_a.loss, budgets)
  rows_b = frontier_rows("dense", lambda c: law_a.loss(c / 4.0), budgets)
  path = plots.compute_equivalence(rows_a, rows_b, str(tmp_path / "eq.png"), label_a="moe", label_b="dense")
  blt = [dict(patch_size=p, params=n, inference_flops_per_byte=2 * n / p, loss=1 + 1 / p + 5 / math.log(n))
         for p in (4, 8) for n in (1e8, 1e9)]
  path2 = plots.fixed_inference(blt, [5e7, 1e8], str(tmp_path / "blt.png"))
  assert os.path.getsize(path) > 5000 and os.path.getsize(path2) > 5000
