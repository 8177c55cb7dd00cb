"""Hash n-gram embeddings (Pagnoni et al. 2024, Sec. 3.2.1, Eqs. 2-4).

    e_i = x_i + sum_{n=n_min..n_max} E_n^hash(Hash(g_{i,n})),   g_{i,n} = (b_{i-n+1}, ..., b_i)
    Hash(g) = RollPolyHash(g) mod table_size,   RollPolyHash(g_{i,n}) = sum_{j=1..n} b_{i-j+1} a^{j-1}

one table E_n per n (the paper: n = 3..8, 500k rows each). The polynomial is evaluated in uint32 with
explicit wrap-around (every product and sum mod 2^32), so the ids are bit-identical on CPU, GPU and TPU.
The base a = 1_000_000_007 is a 10-digit prime as in the paper and fits in uint32. Bytes before the start
of the sequence (or, with `segment_ids`, of another document) are replaced by `HASH_PAD` = 0xFFFF, a value
no byte or special id takes, so an n-gram near the start never aliases a real one.

Several hash functions per n (the official code's `encoder_hash_byte_group_nb_functions`, 3 there): function
f hashes with base `HASH_BASES[f]` into its own tables, and all embeddings are summed, so two n-grams that
collide under one base rarely collide under all. The bases are the primes of the official code's list that fit
in uint32, in its order: 1_000_000_007, 1_500_450_271, 3_267_000_013, 4_093_082_899, 3_628_273_133,
2_860_486_313, 3_367_900_313 (the official second base, 5_915_587_277, does not fit and is skipped). Zero
functions is the ablation without hash embeddings: no tables, the embedding is 0.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

HASH_BASES = (1_000_000_007, 1_500_450_271, 3_267_000_013, 4_093_082_899, 3_628_273_133, 2_860_486_313,
              3_367_900_313)
HASH_BASE = HASH_BASES[0]
HASH_PAD = 0xFFFF


def rolling_poly_hash(byte_ids: jax.Array, n: int, segment_ids: jax.Array | None = None, *,
                      base: int = HASH_BASE) -> jax.Array:
  """uint32 [batch, length]: RollPolyHash of the n ids ending at each position (Horner's rule, oldest
  first: h <- h * a + b, all mod 2^32)."""
  ids = byte_ids.astype(jnp.uint32)
  length = ids.shape[1]
  a = jnp.uint32(base)
  h = jnp.zeros_like(ids)
  for back in range(n - 1, -1, -1):  # b_{i-back}, from b_{i-n+1} to b_i
    shifted = jnp.pad(ids, ((0, 0), (back, 0)), constant_values=HASH_PAD)[:, :length]
    if segment_ids is not None and back:
      seg = jnp.pad(segment_ids, ((0, 0), (back, 0)), constant_values=-1)[:, :length]
      shifted = jnp.where(seg == segment_ids, shifted, jnp.uint32(HASH_PAD))
    h = h * a + shifted
  return h


def ngram_hash_ids(byte_ids: jax.Array, n: int, table_size: int, segment_ids: jax.Array | None = None, *,
                   base: int = HASH_BASE) -> jax.Array:
  """int32 [batch, length]: Hash(g_{i,n}) = RollPolyHash mod table_size."""
  return (rolling_poly_hash(byte_ids, n, segment_ids, base=base) % jnp.uint32(table_size)).astype(jnp.int32)


class HashNGramEmbed(nnx.Module):
  """sum_f sum_n E_{f,n}^hash(Hash_f(g_{i,n})) [batch, length, dim]: one table per hash function f (of
  `n_functions`) and n in [n_min, n_max], function-major (with one function, the paper's one table per n)."""

  def __init__(self, dim: int, *, n_min: int = 3, n_max: int = 8, table_size: int = 500_000,
               n_functions: int = 1, rngs: nnx.Rngs, dtype=jnp.float32):
    if not 1 <= n_min <= n_max:
      raise ValueError(f"need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    if not 0 <= n_functions <= len(HASH_BASES):
      raise ValueError(f"need 0 <= n_functions <= {len(HASH_BASES)} (one base each), got {n_functions}")
    self.ns = tuple(range(n_min, n_max + 1))
    self.bases = HASH_BASES[:n_functions]
    self.table_size = table_size
    self.dim = dim
    self.dtype = dtype
    std = 1.0 / math.sqrt(dim)
    self.tables = nnx.List([
        nnx.Param(std * jax.random.normal(rngs.params(), (table_size, dim), jnp.float32), axes=("vocab", "embed"))
        for _ in self.bases for _ in self.ns])

  def __call__(self, byte_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    out = jnp.zeros((*byte_ids.shape, self.dim), jnp.float32)
    grams = [(base, n) for base in self.bases for n in self.ns]
    for (base, n), table in zip(grams, self.tables):
      ids = ngram_hash_ids(byte_ids, n, self.table_size, segment_ids, base=base)
      out = out + jnp.take(table[...], ids, axis=0)
    return out.astype(self.dtype)
