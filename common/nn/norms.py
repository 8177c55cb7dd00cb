"""RMSNorm (Zhang & Sennrich 2019), the normalisation of Llama-style models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, with the statistics in f32 whatever the compute dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, axes=("embed",)):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=tuple(axes))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale[...]).astype(self.dtype)
