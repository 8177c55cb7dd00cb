"""The pre-norm transformer block of Llama-style models: x + attn(norm(x)), then x + ffn(norm(x))."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.attention import Attention
from common.nn.kv_cache import KVCache
from common.nn.mlp import SwiGLU
from common.nn.moe import MoE
from common.nn.norms import RMSNorm


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """The hyperparameters of one block, so that any model (the dense LM, BLT's local and global stacks, MoMa)
  builds blocks from its own config section. `n_layers` is the depth of the stack the block sits in: output
  projections start at 1/sqrt(2 n_layers) so the residual stream's variance does not grow with depth."""
  d_model: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  n_layers: int
  head_dim: int = 0  # 0 = d_model // n_heads
  window: int = 0  # sliding attention window; 0 = full causal
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs of common.nn.rope's scaling
  qk_norm: bool = False
  qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
  causal: bool = True  # False: a bidirectional (encoder) layer, with no cached decoding
  dtype: Any = jnp.float32  # compute dtype (common.nn.dtypes)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def out_scale(self) -> float:
    return 1.0 / math.sqrt(2 * self.n_layers)


class Block(nnx.Module):
  """One decoder layer. `ffn` may be any module mapping [batch, length, d_model] to the same shape
  (a SwiGLU by default; MoE layers plug in here)."""

  def __init__(self, spec: BlockSpec, *, rngs: nnx.Rngs, ffn: nnx.Module | None = None):
    s, dtype = spec, spec.dtype
    self.attn_norm = RMSNorm(s.d_model, eps=s.norm_eps, dtype=dtype)
    self.attn = Attention(s.d_model, s.n_heads, s.n_kv_heads, s.resolved_head_dim, rngs=rngs,
                          rope_theta=s.rope_theta, rope_scaling=dict(s.rope_scaling) or None, window=s.window,
                          qk_norm=s.qk_norm, norm_eps=s.norm_eps, dtype=dtype, out_scale=s.out_scale,
                          qkv_bias=s.qkv_bias, causal=s.causal)
    self.ffn_norm = RMSNorm(s.d_model, eps=s.norm_eps, dtype=dtype)
    self.ffn = ffn if ffn is not None else SwiGLU(s.d_model, s.d_ff, rngs=rngs, dtype=dtype,
                                                  out_scale=s.out_scale)

  def _ffn(self, h: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """An MoE ffn routes only real tokens (padding: segment id 0, as `common.data.packing` writes it)."""
    if isinstance(self.ffn, MoE):
      return self.ffn(h, mask=segment_ids > 0)
    return self.ffn(h)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               key_bias: jax.Array | None = None) -> jax.Array:
    """key_bias: an optional per-key attention bias [batch, length] (`common.nn.attention`)."""
    x = x + self.attn(self.attn_norm(x), positions, segment_ids, key_bias)
    return x + self._ffn(self.ffn_norm(x), segment_ids)

  def decode(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache,
             advance: jax.Array | None = None, key_bias: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """`__call__` on new tokens with the layer's key/value cache (`Attention.decode`; key_bias over the row's
    tokens): (x, updated cache)."""
    attn_out, cache = self.attn.decode(self.attn_norm(x), positions, segment_ids, cache, advance, key_bias)
    x = x + attn_out
    return x + self._ffn(self.ffn_norm(x), segment_ids), cache
