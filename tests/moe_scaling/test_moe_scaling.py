"""The moe_scaling study package: the FLOP-matched dense/MoE pairing (counted by common.flops), the objective,
the evaluation data and the compute-equivalence summary over seeds (training: test_moe_training.py)."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import flops
from common.models import DenseLM
from common.tasks.lm import next_token_loss
from moe_scaling import data, evaluate
from moe_scaling.configs.tiny import get_config
from moe_scaling.reproduce import summarize


def test_paper_configs_use_fairseqs_second_expert_rule_and_dropless_evaluation():
  moe = get_config("family=moe,d_model=32").model.moe
  assert moe.second_policy == "sampling" and moe.eval_capacity_token_fraction == 0.0


def _paired(d_model, pairing, experts=8):
  dense = get_config(f"family=dense,d_model={d_model}").model
  moe = get_config(f"family=moe,d_model={d_model},experts={experts},pairing={pairing}").model
  dense.vocab_size = moe.vocab_size = 256
  return dense, moe


@pytest.mark.parametrize("d_model", [32, 64, 96])
def test_flops_pairing_costs_the_dense_flops_plus_the_routers(d_model):
  dense, moe = _paired(d_model, "flops")
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
    assert dense[key] == moe[key]
  assert moe.moe.num_experts == 8 and moe.moe.top_k == 2 and moe.moe.every == 2
  routers = 2 * (2 * d_model * 8)  # 2 MoE layers of 4, one logit per expert
  assert flops.dense_lm_flops(moe, 128).mlp == flops.dense_lm_flops(dense, 128).mlp
  assert flops.training_flops_per_token(moe, 128) - flops.training_flops_per_token(dense, 128) == 3 * routers
  ratio = flops.training_flops_per_token(moe, 128) / flops.training_flops_per_token(dense, 128)
  assert 1 < ratio < 1.01


def test_shape_pairing_pays_one_more_expert_per_moe_layer():
  dense, moe = _paired(64, "shape", experts=4)
  assert moe.moe.d_ff in (0, dense.d_ff)
  extra = flops.dense_lm_flops(moe, 128).forward - flops.dense_lm_flops(dense, 128).forward
  assert extra == 2 * (6 * 64 * 256 + 2 * 64 * 4)  # 2 MoE layers: one more SwiGLU (d_ff 256) and the router


def test_flops_pairing_has_k_times_narrower_experts_and_more_parameters():
  dense, moe = _paired(64, "flops")
  assert moe.moe.d_ff * moe.moe.top_k == dense.d_ff
  p_dense, p_moe = flops.param_count(dense), flops.param_count(moe)
  assert p_moe["active_non_embedding"] == p_dense["non_embedding"] + 2 * 64 * 8  # + the routers
  assert p_moe["non_embedding"] > 2 * p_dense["non_embedding"]  # 8 experts of half width in 2 of 4 layers


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
  np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 0])  # padding: segment 0, never routed


@pytest.mark.parametrize("task", sorted(data.TASKS))
def test_priming_tasks_are_deterministic_with_distinct_choices(task):
  a, b = data.priming_examples(task, 5, 2), data.priming_examples(task, 5, 2)
  assert a == b
  for prompt, choices in a:
    assert len(choices) == 4 and len(set(choices)) == 4 and prompt.count("\n") >= 2


def _law_rows(dense_factor, seeds=(0,)):
  """Rows of both families on exact laws: the MoE at C has the dense loss at dense_factor[seed] * C."""
  rows = []
  for seed in seeds:
    for c in (1e12, 1e13, 1e14):
      d_model = int(c / 1e12)
      rows.append(dict(family="dense", d_model=d_model, seed=seed, budget=d_model, flops=c,
                       in_loss=1.0 + 10 * c ** -0.1))
      rows.append(dict(family="moe", d_model=d_model, seed=seed, budget=d_model, flops=c,
                       in_loss=1.0 + 10 * (dense_factor[seed] * c) ** -0.1))
  return rows


def test_compute_equivalence_factor_recovers_the_planted_ratio():
  summary = summarize(_law_rows({0: 4.0}))
  assert [s["d_model"] for s in summary] == [1, 10, 100]
  for s in summary:
    assert s["factor"] == pytest.approx(4.0, rel=0.02) and s["n"] == 1 and np.isnan(s["ci95"])


def test_factor_over_seeds_is_the_mean_with_a_t_interval():
  summary = summarize(_law_rows({0: 3.0, 1: 5.0}, seeds=(0, 1)))
  for s in summary:
    assert s["factor"] == pytest.approx(4.0, rel=0.02) and s["n"] == 2
    assert s["ci95"] == pytest.approx(12.706 * 1.0, rel=0.03)  # t_0.975,1 * sd(3, 5) / sqrt(2) = 12.706 * 1


def test_choice_rows_score_only_the_choice_after_the_prompt():
  rows = evaluate.choice_rows("abcdef", ["x", "yz"], seq_len=5)
  np.testing.assert_array_equal(rows["targets"][0], [ord(c) + 3 for c in "cdefx"])
  np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 0, 0, 1])
  np.testing.assert_array_equal(rows["targets"][1], [ord(c) + 3 for c in "defyz"])
  np.testing.assert_array_equal(rows["loss_mask"][1], [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(rows["inputs"][1], [0] + [ord(c) + 3 for c in "defy"])
  short = evaluate.choice_rows("ab", ["x"], seq_len=5)
  np.testing.assert_array_equal(short["segment_ids"][0], [1, 1, 1, 0, 0])


def test_rows_added_to_fill_a_batch_are_padding():
  rows = evaluate.pad_rows(evaluate.choice_rows("abc", ["x", "y"], seq_len=6), 4)
  assert len(rows["inputs"]) == 4
  for key in ("inputs", "targets", "segment_ids", "loss_mask"):
    assert not rows[key][2:].any()
  np.testing.assert_array_equal(rows["positions"][3], np.arange(6))
