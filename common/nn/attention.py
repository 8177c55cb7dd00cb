"""Multi-head attention with grouped-query heads (Ainslie et al. 2023), RoPE, and masks built from segment
ids (packed documents never see each other), causality and an optional sliding window. Optional biases on the
query, key and value projections (not the output) are the one attention difference of Qwen2 (Yang et al. 2024,
"Qwen2 Technical Report", section 2.2) from Llama.

An optional additive per-key bias, `key_bias` f32 [batch, kv_len], is added to every query's score of key j in
every head: log m_j turns attention into attention over keys weighted by m_j (m_j = 0, a bias of -inf or a
large negative number: a key no query sees), the evidence mask of EASE (Li et al. 2021, arXiv 2105.06982). None
(the default) leaves the computation, and the compiled program, as without it. Bidirectional layers
(`causal=False`, an encoder over a document) attend within their segment both ways and have no cached form."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.kv_cache import (KVCache, cache_key_bias, cache_mask, decode_key_bias, decode_mask,
                                write as write_cache, writes_in_place)
from common.nn.linear import Linear
from common.nn.norms import RMSNorm
from common.nn.rope import apply_rope, rope_frequencies


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, *, causal: bool = True,
                   window: int = 0) -> jax.Array:
  """Boolean mask [batch, 1, q_len, kv_len]: same segment, and (if causal) key index <= query index, and
  (if window > 0) query index - key index < window. Queries are the last q_len positions of the keys."""
  q_len, kv_len = q_segment_ids.shape[-1], kv_segment_ids.shape[-1]
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  q_idx = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  k_idx = jnp.arange(kv_len)[None, :]
  if causal:
    mask &= k_idx <= q_idx
  if window:
    mask &= q_idx - k_idx < window
  return mask[:, None]


def _heads_major(q: jax.Array, k: jax.Array, v: jax.Array):
  """q [batch, q_len, heads, head_dim] -> [batch, kv_heads, group, q_len, head_dim], scaled by 1/sqrt(d);
  k, v [batch, kv_len, kv_heads, head_dim] -> [batch, kv_heads, 1, kv_len, head_dim]. In this layout both
  attention products are plain batched matmuls (batch axes first, contraction last), which XLA:CPU runs
  without transposing its operands."""
  heads_major = lambda x: x.transpose(0, 2, 1, 3)[:, :, None]
  return _heads_major_queries(q, k.shape[2]), heads_major(k), heads_major(v)


def _heads_major_queries(q: jax.Array, kv_heads: int) -> jax.Array:
  """q [batch, q_len, heads, head_dim] -> [batch, kv_heads, group, q_len, head_dim], scaled by 1/sqrt(d)."""
  b, lq, h, d = q.shape
  q = q.reshape(b, lq, kv_heads, h // kv_heads, d) * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
  return q.transpose(0, 2, 3, 1, 4)


def _attend(qh: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array | None,
            key_bias: jax.Array | None = None) -> jax.Array:
  """Masked softmax attention in the heads-major layout of `_heads_major`; mask [batch, 1, q_len, kv_len];
  key_bias [batch, kv_len] added to every query's score of each key."""
  scores = jnp.einsum("...qd,...sd->...qs", qh, kh, preferred_element_type=jnp.float32)
  if key_bias is not None:
    scores = scores + key_bias.astype(jnp.float32)[:, None, None, None, :]
  if mask is not None:
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
  return jnp.einsum("...qs,...sd->...qd", probs, vh)


def _tokens_major(out: jax.Array) -> jax.Array:
  """[batch, kv_heads, group, q_len, head_dim] -> [batch, q_len, heads, head_dim]."""
  b, kv_heads, group, lq, d = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, kv_heads * group, d)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          key_bias: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d) + key_bias) v with query heads grouped onto shared key/value heads.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
  mask: bool [batch, 1, q_len, kv_len]; key_bias: f32 [batch, kv_len] or None. Scores and softmax in f32.
  Returns [batch, q_len, heads, head_dim].
  """
  return _tokens_major(_attend(*_heads_major(q, k, v), mask, key_bias))


def blockwise_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                               window: int = 0, block: int = 128, key_bias: jax.Array | None = None) -> jax.Array:
  """Causal self-attention computed one query block at a time, each block attending only to the keys it can
  see (those up to its last query, and within the window): the same result as `dot_product_attention` with
  the full mask, with the fully masked upper-triangle blocks never computed (about half the scores at long
  lengths; with a window w, each block of B queries reads w + B keys instead of all of them). Shapes as in
  `dot_product_attention`, with q_len == kv_len. The operands go to the heads-major layout once, not once
  per block; each block takes the bias of the keys it reads."""
  length = q.shape[1]
  if length <= block:
    return dot_product_attention(q, k, v, attention_mask(segment_ids, segment_ids, window=window), key_bias)
  qh, kh, vh = _heads_major(q, k, v)
  outs = []
  for start in range(0, length, block):
    end = min(start + block, length)
    first = 0 if not window else max(0, (start - window + 1) // block * block)
    mask = attention_mask(segment_ids[:, start:end], segment_ids[:, first:end], window=window)
    bias = None if key_bias is None else key_bias[:, first:end]
    outs.append(_attend(qh[..., start:end, :], kh[..., first:end, :], vh[..., first:end, :], mask, bias))
  return _tokens_major(jnp.concatenate(outs, axis=-2))


class Attention(nnx.Module):
  """Self-attention block body: projections, optional QK-norm, RoPE, masked GQA, output projection.
  `causal=False`: every token of a segment sees every other (an encoder layer)."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, rngs: nnx.Rngs,
               rope_theta: float = 10000.0, rope_scaling: dict | None = None, window: int = 0,
               qk_norm: bool = False, norm_eps: float = 1e-5, dtype=jnp.float32, out_scale: float = 1.0,
               qkv_bias: bool = False, causal: bool = True):
    if n_heads % n_kv_heads:
      raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    if window and not causal:
      raise ValueError(f"window={window}: a sliding window needs causal attention")
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    self.q = Linear(d_model, (n_heads, head_dim), axes=("embed", "heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.k = Linear(d_model, (n_kv_heads, head_dim), axes=("embed", "kv_heads", "head_dim"), rngs=rngs,
                    dtype=dtype)
    self.v = Linear(d_model, (n_kv_heads, head_dim), axes=("embed", "kv_heads", "head_dim"), rngs=rngs,
                    dtype=dtype)
    self.o = Linear(n_heads * head_dim, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                    init_scale=out_scale)
    self.q_norm = RMSNorm(head_dim, eps=norm_eps, dtype=dtype, axes=("head_dim",)) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, eps=norm_eps, dtype=dtype, axes=("head_dim",)) if qk_norm else None
    bias = lambda heads, axis: nnx.Param(jnp.zeros((heads, head_dim), jnp.float32), axes=(axis, "head_dim"))
    self.q_bias = bias(n_heads, "heads") if qkv_bias else None  # [heads, head_dim]
    self.k_bias = bias(n_kv_heads, "kv_heads") if qkv_bias else None  # [kv_heads, head_dim]
    self.v_bias = bias(n_kv_heads, "kv_heads") if qkv_bias else None
    # Static (hashable) so the frequencies are a compile-time constant, not model state.
    self.rope = (head_dim, float(rope_theta), tuple(sorted((rope_scaling or {}).items())))
    self.window, self.causal = window, causal

  def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projections (+ biases), QK-norm and RoPE at absolute `positions`: q [batch, length, heads, head_dim],
    k and v [batch, length, kv_heads, head_dim]."""
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.q_bias is not None:
      q, k, v = (y + b[...].astype(y.dtype) for y, b in ((q, self.q_bias), (k, self.k_bias), (v, self.v_bias)))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_frequencies(self.rope[0], self.rope[1], dict(self.rope[2]))
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               key_bias: jax.Array | None = None) -> jax.Array:
    """x [batch, length, d_model] at `positions`; key_bias f32 [batch, length] or None (module docstring)."""
    q, k, v = self._qkv(x, positions)
    if self.causal:
      out = blockwise_causal_attention(q, k, v, segment_ids, window=self.window, key_bias=key_bias)
    else:
      out = dot_product_attention(q, k, v, attention_mask(segment_ids, segment_ids, causal=False), key_bias)
    return self.o(out.reshape(*out.shape[:2], -1))

  def decode(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache,
             advance: jax.Array | None = None, key_bias: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Incremental form of `__call__`: new tokens x [batch, new, d_model] at absolute `positions` attend to
    the cached keys and to each other (`common.nn.kv_cache`); returns (output, cache with them appended).
    Where it is exact (`writes_in_place`: a decode step, or a prefill into a full-attention cache) the new
    keys are written first and the queries attend over the heads-major cache in place; otherwise (rows that
    do not advance, a prompt longer than one step into a ring buffer) over the cache and the new keys
    side by side. `key_bias` [batch, n] is over the tokens of each row, the key axis of `__call__` (token i of
    a row, whatever its position or segment), and each cached key takes the bias of its token
    (`kv_cache.cache_key_bias`), so decoding with it equals the full forward with it, ring buffers included."""
    if not self.causal:
      raise ValueError("a bidirectional attention layer (causal=False) has no cached incremental form")
    q, k, v = self._qkv(x, positions)
    qh = _heads_major_queries(q, self.n_kv_heads)
    if writes_in_place(cache, x.shape[1], self.window, advance):
      cache = write_cache(cache, k, v, positions, segment_ids)
      mask = cache_mask(cache, positions, segment_ids, window=self.window)
      bias = None if key_bias is None else cache_key_bias(cache, key_bias)
      keys, values = cache.k, cache.v  # [batch, kv_heads, slots, head_dim]
    else:
      mask = decode_mask(cache, positions, segment_ids, window=self.window)
      bias = None if key_bias is None else decode_key_bias(cache, key_bias, x.shape[1])
      keys = jnp.concatenate([cache.k, k.transpose(0, 2, 1, 3).astype(cache.k.dtype)], axis=2)
      values = jnp.concatenate([cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype)], axis=2)
      cache = write_cache(cache, k, v, positions, segment_ids, advance)
    out = _attend(qh, keys[:, :, None].astype(q.dtype), values[:, :, None].astype(v.dtype), mask, bias)
    out = _tokens_major(out)
    return self.o(out.reshape(*out.shape[:2], -1)), cache
