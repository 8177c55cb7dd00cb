"""E SwiGLU experts stored as stacked weights, and the two ways to run them.

`run_batched`: every expert applied to its own fixed-size buffer ([E, C, d] -> [E, C, d]), one batched matmul
per projection (the capacity and expert-choice modes). `run_grouped`: rows sorted by expert and multiplied
with a grouped matmul over variable-size groups (the dropless mode, as in MegaBlocks, Gale et al. 2022,
arXiv 2211.15841): `common.kernels.grouped_matmul`, the Pallas kernel on GPU, `ragged_dot` on TPU and a
row-tiled loop of dense products on CPU, each at about the true FLOPs (`impl` forces one).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from common.kernels.grouped_matmul import grouped_matmul


class Experts(nnx.Module):
  """Weights of E SwiGLU experts: gate_up [E, d_model, 2, d_ff], down [E, d_ff, d_model]."""

  def __init__(self, n_experts: int, d_model: int, d_ff: int, *, rngs: nnx.Rngs, out_scale: float = 1.0):
    def init(shape, fan_in, scale):
      std = scale / math.sqrt(fan_in)
      return std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    self.gate_up = nnx.Param(init((n_experts, d_model, 2, d_ff), d_model, 1.0),
                             axes=("expert", "embed", None, "mlp"))
    self.down = nnx.Param(init((n_experts, d_ff, d_model), d_ff, out_scale), axes=("expert", "mlp", "embed"))


def run_batched(x: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
  """x [E, C, d] through expert e's SwiGLU for buffer e -> [E, C, d] (computed in x.dtype)."""
  h = jnp.einsum("ecd,edgf->ecgf", x, gate_up.astype(x.dtype))
  h = jax.nn.silu(h[..., 0, :]) * h[..., 1, :]
  return jnp.einsum("ecf,efd->ecd", h, down.astype(x.dtype))


def run_grouped(x: jax.Array, gate_up: jax.Array, down: jax.Array, group_sizes: jax.Array, *,
                impl: str = "auto") -> jax.Array:
  """x [N, d], rows sorted by expert with group_sizes [E] rows each -> [N, d]. Rows past sum(group_sizes)
  belong to no group and come out as zeros. `impl`: see `common.kernels.grouped_matmul.ops`."""
  n_experts, d_model, _, d_ff = gate_up.shape
  w = gate_up.astype(x.dtype).reshape(n_experts, d_model, 2 * d_ff)
  h = grouped_matmul(x, w, group_sizes, impl=impl).reshape(x.shape[0], 2, d_ff)
  h = jax.nn.silu(h[:, 0]) * h[:, 1]
  return grouped_matmul(h, down.astype(x.dtype), group_sizes, impl=impl)
