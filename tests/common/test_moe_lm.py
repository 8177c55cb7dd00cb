"""The dense LM with MoE FFNs (`model.moe`): which blocks get experts, parameter and FLOP counts against the
built model and by hand, the auxiliary terms reaching the loss, and config errors that name the key."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import flops
from common.config import ConfigError
from common.configs.base import dense_model
from common.models import DenseLM, validate_model_config
from common.nn import SwiGLU
from common.nn.moe import MoE, moe_loss_terms


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


@pytest.mark.parametrize("key,value", [("num_experts", -1), ("every", 9), ("top_k", 5), ("mode", "sparse"),
                                       ("routing", "hash"), ("capacity_factor", 0.0)])
def test_bad_moe_config_names_the_key(key, value):
  cfg = _cfg()
  cfg.moe[key] = value
  with pytest.raises(ConfigError, match=f"model.moe.{key}"):
    validate_model_config(cfg)
