"""The dense LM with MoE FFNs (`model.moe`): which blocks get experts, parameter and FLOP counts against the
built model and by hand, the auxiliary terms reaching the loss, padding (segment 0) kept out of the routing,
training vs evaluation capacity in the train and eval steps, and config errors that name the key."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from common import flops
from common.config import ConfigError
from common.configs.base import dense_model
from common.models import DenseLM, validate_model_config
from common.nn import SwiGLU
from common.nn.moe import MoE, moe_loss_terms
from common.nn.training_rng import training_rng
from common.tasks.lm import next_token_loss
from common.train.step import make_eval_step, make_train_step


def _cfg(**moe):
  m = dense_model(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64)
  m.moe.update(dict(num_experts=4, **moe))
  return m


def test_every_second_block_is_moe_and_dense_default_has_none():
  model = DenseLM(_cfg(), rngs=nnx.Rngs(params=0))
  assert [type(b.ffn) for b in model.blocks] == [SwiGLU, MoE, SwiGLU, MoE]
  dense = DenseLM(dense_model(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64),
                  rngs=nnx.Rngs(params=0))
  assert all(type(b.ffn) is SwiGLU for b in dense.blocks)


@pytest.mark.parametrize("moe", [dict(), dict(every=1, d_ff=48), dict(routing="expert_choice")])
def test_param_count_matches_built_model(moe):
  cfg = _cfg(**moe)
  model = DenseLM(cfg, rngs=nnx.Rngs(params=0))
  real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert flops.param_count(cfg)["total"] == real


def test_moe_flops_count_router_and_top_k_experts_by_hand():
  cfg = _cfg()
  dense = flops.dense_lm_flops(dense_model(**{k: cfg[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                                                   "n_kv_heads", "d_ff")}), 16)
  sparse = flops.dense_lm_flops(cfg, 16)
  d, ff, e = 32, 64, 4
  assert sparse.router == 2 * 2 * d * e                     # 2 MoE layers, 2 d E each
  assert sparse.mlp == 2 * 6 * d * ff + 2 * 2 * 6 * d * ff  # 2 dense layers + 2 MoE layers with top-2
  assert sparse.forward - dense.forward == sparse.router + 2 * 6 * d * ff
  counts = flops.param_count(cfg)
  assert counts["non_embedding"] - counts["active_non_embedding"] == 2 * (e - 2) * 3 * d * ff


def test_loss_terms_fold_the_averaged_aux_loss_scaled_by_weight():
  cfg = _cfg(z_loss_weight=0.1)
  model = DenseLM(cfg, rngs=nnx.Rngs(params=0))

  @nnx.jit
  def run(model, tokens):
    model(tokens)
    return moe_loss_terms(model, jnp.float32(5.0))

  extra, sums = run(model, jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32))
  per_token = float(sums["moe/balance_loss"]) * 0.01 + float(sums["moe/z_loss"]) * 0.1
  np.testing.assert_allclose(float(extra), per_token, rtol=1e-5)  # both already times the weight 5
  np.testing.assert_allclose(float(sums["moe/aux_loss"]), float(extra), rtol=1e-6)
  assert 0.9 < float(sums["moe/balance_loss"]) / 5.0 < 4.0
  assert moe_loss_terms(model, 5.0)[1] == {}  # popped inside the jit: nothing left on the module


def _unbalanced(model, scale=8.0):
  """Sharpens every router so that training capacity (factor 1) drops tokens."""
  for block in model.blocks:
    if isinstance(block.ffn, MoE):
      block.ffn.router.kernel[...] = scale * block.ffn.router.kernel[...]
  return model


def test_padding_rows_change_nothing_the_real_rows_see():
  """Row 1 is padding (segment 0): under the training capacity (8 slots per expert; routed padding would take
  slots from row 0's second choices) row 0's logits and the routing statistics do not depend on what row 1 holds."""
  model = _unbalanced(DenseLM(_cfg(capacity_factor=0.5), rngs=nnx.Rngs(params=0)))
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
  other = tokens.at[1].set(jnp.asarray(rng.integers(0, 64, 16), jnp.int32))
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  segments = jnp.asarray([[1] * 16, [0] * 16], jnp.int32)

  @nnx.jit
  def run(model, tokens):
    with training_rng(None):
      logits = model(tokens, positions, segments)
    return logits, moe_loss_terms(model, jnp.float32(1.0))[1]

  (logits_a, sums_a), (logits_b, sums_b) = run(model, tokens), run(model, other)
  np.testing.assert_allclose(np.asarray(logits_b[0]), np.asarray(logits_a[0]), rtol=1e-6, atol=1e-6)
  for key in sums_a:
    np.testing.assert_allclose(np.asarray(sums_b[key]), np.asarray(sums_a[key]), rtol=1e-6, err_msg=key)
  assert float(sums_a["moe/fraction_dropped"]) > 0  # the capacity binds


def test_train_step_uses_the_training_capacity_and_eval_step_the_evaluation_one():
  """With no seed the train step has no key, yet its MoE layers use the training capacity (they drop tokens);
  the eval step's are dropless (eval_capacity_token_fraction 0)."""
  cfg = _cfg()
  model = _unbalanced(DenseLM(cfg, rngs=nnx.Rngs(params=0)))
  graphdef, params = nnx.split(model)
  tokens = np.random.default_rng(2).integers(0, 64, (2, 16)).astype(np.int32)
  batch = dict(inputs=tokens, targets=tokens, loss_mask=np.ones((2, 16), np.float32),
               segment_ids=np.ones((2, 16), np.int32), positions=np.tile(np.arange(16, dtype=np.int32), (2, 1)))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  optimizer = optax.sgd(0.0)
  train_step = jax.jit(make_train_step(graphdef, next_token_loss, optimizer, lambda step: 0.0, seed=None))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
               first_bad_step=jnp.full((), -1, jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))
  _, metrics = train_step(state, batch)
  _, weight, sums = jax.jit(make_eval_step(graphdef, next_token_loss))(params, batch)
  assert float(metrics["moe/fraction_dropped"]) > 0
  assert float(sums["moe/fraction_dropped"]) == 0.0


@pytest.mark.parametrize("key,value", [("num_experts", -1), ("every", 9), ("top_k", 5), ("mode", "sparse"),
                                       ("routing", "hash"), ("capacity_factor", 0.0), ("second_policy", "gumbel")])
def test_bad_moe_config_names_the_key(key, value):
  cfg = _cfg()
  cfg.moe[key] = value
  with pytest.raises(ConfigError, match=f"model.moe.{key}"):
    validate_model_config(cfg)
