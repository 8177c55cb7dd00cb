"""A bias-free projection over one or more trailing axes, with logical axis names for sharding."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
  """y = x @ W for W of shape [in_dim, *out_shape]; stored f32, computed in `dtype`."""

  def __init__(self, in_dim: int, out_shape: int | Sequence[int], *, axes: Sequence[str | None],
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, init_scale: float = 1.0):
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    std = init_scale / math.sqrt(in_dim)
    w = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (in_dim, *out_shape), param_dtype)
    self.kernel = nnx.Param(w, axes=tuple(axes))
    self.out_shape = out_shape
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    # As one 2-D [tokens, in] x [in, out] product: XLA:CPU runs batched (3-D) operands and multi-axis kernels
    # through slower paths (measured 1.5x on a SwiGLU fwd+bwd); on GPU/TPU the reshapes are free.
    w = self.kernel[...].astype(self.dtype)
    in_dim = w.shape[0]
    y = jnp.dot(x.reshape(-1, in_dim).astype(self.dtype), w.reshape(in_dim, -1))
    return y.reshape(*x.shape[:-1], *self.out_shape)
