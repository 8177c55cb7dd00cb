"""The study's headline: compute equivalence on the training-FLOPs axis, read from validation curves."""
import math

import numpy as np
import pytest

from moe_scaling import reproduce


def _curve(flops, values):
  return dict(steps=list(range(1, len(flops) + 1)), flops=list(flops), seconds=[math.nan] * len(flops),
              values=list(values))


def _law(c):
  return 1.0 + 10.0 * c ** -0.2


def _runs(factor_by_seed):
  """Dense runs of 3 sizes whose curves lie on one law (each size reaches further along it), MoE runs
  whose loss at C is the dense law's at factor * C."""
  rows = []
  for seed, factor in factor_by_seed.items():
    for d, end in ((32, 1e12), (48, 4e12), (64, 1.6e13)):
      flops = np.geomspace(end / 8, end, 4)
      rows.append(dict(family="dense", d_model=d, seed=seed, curve=_curve(flops, _law(flops))))
      rows.append(dict(family="moe", d_model=d, seed=seed, curve=_curve(flops, _law(factor * flops))))
  return rows


def test_dense_envelope_keeps_the_best_loss_reached_by_each_compute():
  dense = [dict(curve=_curve([1, 2, 4], [5.0, 4.0, 3.5])), dict(curve=_curve([2, 4, 8], [4.5, 3.0, 2.0]))]
  compute, loss = reproduce.dense_envelope(dense)
  np.testing.assert_array_equal(compute, [1, 2, 4, 8])
  np.testing.assert_array_equal(loss, [5.0, 4.0, 3.0, 2.0])


def test_curve_equivalence_recovers_a_planted_factor_with_a_t_interval():
  out = reproduce.curve_equivalence(_runs({0: 3.0, 1: 5.0}))
  assert [o["d_model"] for o in out] == [32, 48, 64]
  for o in out:
    assert o["factor"] == pytest.approx(4.0, rel=0.02) and o["factor_half"] == pytest.approx(4.0, rel=0.02)
    assert o["n"] == 2 and o["ci95"] == pytest.approx(12.706, rel=0.03)  # t_0.975,1 * sd(3, 5) / sqrt(2)
  # where factor x the MoE compute passes the largest dense compute (1.6e13), the MoE loss is below every dense
  # point and the law is extrapolated: d48 at factor 5 (2e13), d64 at both
  assert [o["beyond_dense"] for o in out] == [0, 1, 2]


def test_curve_equivalence_is_one_when_moe_is_dense():
  for o in reproduce.curve_equivalence(_runs({0: 1.0})):
    assert o["factor"] == pytest.approx(1.0, rel=0.02) and o["beyond_dense"] == 0


def test_final_point_factor_says_never_where_the_moe_loss_is_below_the_dense_floor():
  rows = []
  for seed in (0, 1):
    for d, c in ((32, 1e12), (48, 4e12), (64, 1.6e13)):
      rows.append(dict(family="dense", d_model=d, seed=seed, budget=d, flops=c, in_loss=1.5 + 10 * c ** -0.1))
      # d64's MoE loss (1.2) is below the dense law's floor E (about 1.5) in seed 1 only
      loss = 1.2 if (d, seed) == (64, 1) else 1.5 + 10 * (2 * c) ** -0.1
      rows.append(dict(family="moe", d_model=d, seed=seed, budget=d, flops=c, in_loss=loss))
  out = {s["d_model"]: s for s in reproduce.summarize(rows)}
  assert out[32]["never"] == 0 and out[32]["factor"] == pytest.approx(2.0, rel=0.05)
  assert out[64]["never"] == 1 and out[64]["n"] == 2 and out[64]["factor"] == pytest.approx(2.0, rel=0.05)
  assert reproduce.format_factor(out[64]).endswith(", never in 1/2")
  assert reproduce.format_factor(dict(out[64], never=2)) == "never (2/2 seeds)"
