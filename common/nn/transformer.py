"""The pre-norm transformer block of Llama-style models: x + attn(norm(x)), then x + ffn(norm(x))."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.attention import Attention
from common.nn.kv_cache import KVCache
from common.nn.mlp import SwiGLU
from common.nn.norms import RMSNorm


class Block(nnx.Module):
  """One decoder layer. `ffn` may be any module mapping [batch, length, d_model] to the same shape
  (a SwiGLU by default; MoE layers plug in here)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, ffn: nnx.Module | None = None):
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, head_dim, rngs=rngs,
                          rope_theta=cfg.rope_theta, rope_scaling=_rope_scaling(cfg), window=cfg.window,
                          qk_norm=cfg.get("qk_norm", False), norm_eps=cfg.norm_eps, dtype=dtype,
                          out_scale=out_scale)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.ffn = ffn if ffn is not None else SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=dtype,
                                                  out_scale=out_scale)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    return x + self.ffn(self.ffn_norm(x))

  def decode(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache,
             advance: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """`__call__` on new tokens with the layer's key/value cache (`Attention.decode`): (x, updated cache)."""
    attn_out, cache = self.attn.decode(self.attn_norm(x), positions, segment_ids, cache, advance)
    x = x + attn_out
    return x + self.ffn(self.ffn_norm(x)), cache


def _rope_scaling(cfg) -> dict | None:
  scaling = cfg.get("rope_scaling")
  return dict(scaling) if scaling else None
