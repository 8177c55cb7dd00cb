"""Hash n-gram embeddings (Pagnoni et al. 2024, Sec. 3.2.1, Eqs. 2-4).

    e_i = x_i + sum_{n=n_min..n_max} E_n^hash(Hash(g_{i,n})),   g_{i,n} = (b_{i-n+1}, ..., b_i)
    Hash(g) = RollPolyHash(g) mod table_size,   RollPolyHash(g_{i,n}) = sum_{j=1..n} b_{i-j+1} a^{j-1}

one table E_n per n (the paper: n = 3..8, 500k rows each). The polynomial is evaluated in uint32 with
explicit wrap-around (every product and sum mod 2^32), so the ids are bit-identical on CPU, GPU and TPU.
The base a = 1_000_000_007 is a 10-digit prime as in the paper and fits in uint32. Bytes before the start
of the sequence (or, with `segment_ids`, of another document) are replaced by `HASH_PAD` = 0xFFFF, a value
no byte or special id takes, so an n-gram near the start never aliases a real one.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

HASH_BASE = 1_000_000_007
HASH_PAD = 0xFFFF


def rolling_poly_hash(byte_ids: jax.Array, n: int, segment_ids: jax.Array | None = None) -> jax.Array:
  """uint32 [batch, length]: RollPolyHash of the n ids ending at each position (Horner's rule, oldest
  first: h <- h * a + b, all mod 2^32)."""
  ids = byte_ids.astype(jnp.uint32)
  length = ids.shape[1]
  a = jnp.uint32(HASH_BASE)
  h = jnp.zeros_like(ids)
  for back in range(n - 1, -1, -1):  # b_{i-back}, from b_{i-n+1} to b_i
    shifted = jnp.pad(ids, ((0, 0), (back, 0)), constant_values=HASH_PAD)[:, :length]
    if segment_ids is not None and back:
      seg = jnp.pad(segment_ids, ((0, 0), (back, 0)), constant_values=-1)[:, :length]
      shifted = jnp.where(seg == segment_ids, shifted, jnp.uint32(HASH_PAD))
    h = h * a + shifted
  return h


def ngram_hash_ids(byte_ids: jax.Array, n: int, table_size: int,
                   segment_ids: jax.Array | None = None) -> jax.Array:
  """int32 [batch, length]: Hash(g_{i,n}) = RollPolyHash mod table_size."""
  return (rolling_poly_hash(byte_ids, n, segment_ids) % jnp.uint32(table_size)).astype(jnp.int32)


class HashNGramEmbed(nnx.Module):
  """sum_n E_n^hash(Hash(g_{i,n})) [batch, length, dim], one table per n in [n_min, n_max]."""

  def __init__(self, dim: int, *, n_min: int = 3, n_max: int = 8, table_size: int = 500_000,
               rngs: nnx.Rngs, dtype=jnp.float32):
    if not 1 <= n_min <= n_max:
      raise ValueError(f"need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    self.ns = tuple(range(n_min, n_max + 1))
    self.table_size = table_size
    self.dtype = dtype
    std = 1.0 / math.sqrt(dim)
    self.tables = nnx.List([
        nnx.Param(std * jax.random.normal(rngs.params(), (table_size, dim), jnp.float32), axes=("vocab", "embed"))
        for _ in self.ns])

  def __call__(self, byte_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    out = 0.0
    for n, table in zip(self.ns, self.tables):
      ids = ngram_hash_ids(byte_ids, n, self.table_size, segment_ids)
      out = out + jnp.take(table[...], ids, axis=0)
    return out.astype(self.dtype)
