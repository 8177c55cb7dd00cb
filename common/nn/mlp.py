"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""
from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.linear import Linear


class SwiGLU(nnx.Module):

  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype=jnp.float32, out_scale: float = 1.0):
    self.gate = Linear(d_model, d_ff, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.up = Linear(d_model, d_ff, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.down = Linear(d_ff, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype, init_scale=out_scale)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
