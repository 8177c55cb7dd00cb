"""The moe_scaling study package: the dense/MoE pairing, the objective, the evaluation data and the
compute-equivalence summary (training itself is smoke-run by hand: `python -m moe_scaling.train`)."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import flops
from common.models import DenseLM
from common.train.lm_task import next_token_loss
from moe_scaling import data, model
from moe_scaling.configs.tiny import get_config
from moe_scaling.reproduce import summarize


def test_moe_partner_has_the_dense_shape_plus_experts():
  dense, moe = get_config("family=dense,d_model=64").model, get_config("family=moe,d_model=64,experts=4").model
  for key in ("d_model", "n_layers", "n_heads", "d_ff"):
    assert dense[key] == moe[key]
  assert dense.moe.num_experts == 0 and moe.moe.num_experts == 4 and moe.moe.top_k == 2
  dense.vocab_size = moe.vocab_size = 256
  extra = flops.dense_lm_flops(moe, 128).forward - flops.dense_lm_flops(dense, 128).forward
  assert extra == 2 * (6 * 64 * 256 + 2 * 64 * 4)  # 2 MoE layers: one more expert and the router each


def test_objective_is_nll_plus_weighted_aux_loss():
  cfg = get_config("family=moe,d_model=32,experts=4").model
  cfg.vocab_size = 128
  m = DenseLM(cfg, rngs=nnx.Rngs(params=0))
  rows = data.lm_rows(["def f(x):\n    return x + 1\n"] * 4, 16, 4)
  total, weight, sums = nnx.jit(next_token_loss)(m, {k: jnp.asarray(v) for k, v in rows.items()})
  np.testing.assert_allclose(float(total), float(sums["nll"] + sums["moe/aux_loss"]), rtol=1e-6)
  assert float(weight) == rows["loss_mask"].sum() and float(sums["moe/aux_loss"]) > 0


def test_lm_rows_are_shifted_byte_ids():
  rows = data.lm_rows(["ab"], 4, 2)
  np.testing.assert_array_equal(rows["targets"][0], [97 + 3, 98 + 3, 1, 0])
  np.testing.assert_array_equal(rows["inputs"][0], [0, 97 + 3, 98 + 3, 1])
  np.testing.assert_array_equal(rows["loss_mask"][0], [1, 1, 1, 0])


@pytest.mark.parametrize("task", sorted(data.TASKS))
def test_priming_tasks_are_deterministic_with_distinct_choices(task):
  a, b = data.priming_examples(task, 5, 2), data.priming_examples(task, 5, 2)
  assert a == b
  for prompt, choices in a:
    assert len(choices) == 4 and len(set(choices)) == 4 and prompt.count("\n") >= 2


def test_compute_equivalence_factor_above_one_when_moe_law_is_better():
  rows = []
  for c in (1e12, 1e13, 1e14):
    rows.append(dict(family="dense", d_model=int(c / 1e12), seed=0, budget=c, flops=c, eval_loss=10 * c ** -0.05))
    rows.append(dict(family="moe", d_model=int(c / 1e12), seed=0, budget=c, flops=c,
                     eval_loss=10 * (4 * c) ** -0.05))  # MoE at C = dense at 4C
  summary = summarize(rows)
  assert [s["d_model"] for s in summary] == [1, 10, 100]
  for s in summary:
    assert s["factor"] == pytest.approx(4.0, rel=0.05)
