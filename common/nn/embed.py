"""Token embedding table, also usable as the (tied) output projection."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class Embed(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    table = jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32) / math.sqrt(dim)
    self.embedding = nnx.Param(table, axes=("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits x @ E^T [..., vocab]."""
    return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(self.dtype))
