"""BLT FLOPs (common.flops.blt_flops): hand arithmetic for a toy config, and XLA's own count of a forward pass.

Tolerance against XLA: 10%. XLA's cost analysis counts every HLO op of our dense masked implementation, so it
adds the element-wise work the model count leaves out by convention (softmax, RMSNorm, SiLU, RoPE, residuals,
the rolling hash, the max-pool); at these widths that is a few percent (measured 1-3%). The model count with
causal=False counts what the dense implementation executes (all keys scored), which is what XLA sees.
"""
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from blt.model import BLT, blt_model
from blt.patcher import patch
from common.flops import blt_flops, flops_for, training_flops_per_token


def _cfg(max_patches=0, patch_size=4, **kw):
  m = blt_model(**kw)
  m.patching = ml_collections.ConfigDict(dict(method="static", patch_size=patch_size, max_patches=max_patches,
                                              threshold=0.0, max_patch_length=0))
  return m


def test_toy_config_by_hand():
  m = _cfg(d_local=8, n_heads_local=2, local_window=0, n_layers_encoder=1, n_layers_decoder=1, n_heads_cross=2,
           d_global=16, n_layers_global=1, n_heads_global=2)
  # L = 16 bytes, P = 4 -> N = 4 patches, r = 1/4 patches per byte; d_ff = 4 d.
  local = 4 * 2 * 8 * 8 + 4 * 8 * 8.5 + 6 * 8 * 32          # q,k,v,o + attention ((16+1)/2 keys) + SwiGLU
  enc_cross = 2 * 64 / 4 + 2 * (2 * 64) + (2 * 64 + 2 * 8 * 16) / 4 + 4 * 8  # q/P, k, v, (o + to_global)/P, attn
  global_ = (4 * 2 * 16 * 16 + 4 * 16 * 2.5 + 6 * 16 * 64) / 4   # one d_g layer over 4 patches, per byte
  dec_cross = 2 * 64 + 2 * 64 + 2 * (2 * 16 * 8) / 4 + 4 * 8 * 1.5  # q, o, k/P, v/P, attn ((4-1)/2 patches)
  logits = 2 * 8 * 260
  expected = 2 * local + enc_cross + global_ + dec_cross + logits
  assert expected == 11736
  got = blt_flops(m, 16)
  assert got.forward == pytest.approx(expected)
  assert got.embedding == 0  # hash n-gram and byte embeddings are lookups
  assert flops_for(m, 16).forward == got.forward  # registered under model.name 'blt'
  assert training_flops_per_token(m, 16) == pytest.approx(3 * expected)


def test_global_cost_shrinks_with_patch_size():
  small, large = (blt_flops(_cfg(patch_size=p, d_global=512), 256) for p in (4, 8))
  assert large.forward < small.forward
  assert large.logits == small.logits  # per-byte parts do not depend on P


def test_matches_xla_cost_analysis_of_forward():
  length, p = 128, 4
  m = _cfg(max_patches=length // p, patch_size=p, d_local=64, d_global=128, local_window=0)
  graphdef, params = nnx.split(BLT(m, rngs=nnx.Rngs(0)))

  def forward(params, x):
    q = patch(x, method="static", max_patches=length // p, patch_size=p)
    return nnx.merge(graphdef, params)(x, q.patch_ids, length // p, next_patch_ids=q.next_patch_ids)

  x = jnp.zeros((2, length), jnp.int32)
  cost = jax.jit(forward).lower(params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_per_byte = cost["flops"] / x.size
  ours = blt_flops(m, length, causal=False).forward
  assert xla_per_byte == pytest.approx(ours, rel=0.10)
  assert blt_flops(m, length).forward < ours  # model FLOPs count only the keys a query may see
