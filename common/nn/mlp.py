"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.linear import Linear


class SwiGLU(nnx.Module):

  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype=jnp.float32, out_scale: float = 1.0):
    # gate and up as one [d_model, 2, d_ff] matmul: one large product instead of two half-size ones.
    self.gate_up = Linear(d_model, (2, d_ff), axes=("embed", None, "mlp"), rngs=rngs, dtype=dtype)
    self.down = Linear(d_ff, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype, init_scale=out_scale)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate_up = self.gate_up(x)  # [..., 2, d_ff]
    return self.down(jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :])
