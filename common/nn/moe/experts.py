"""E SwiGLU experts stored as stacked weights, and the two ways to run them.

`run_batched`: every expert applied to its own fixed-size buffer ([E, C, d] -> [E, C, d]), one batched matmul
per projection (the capacity and expert-choice modes). `run_grouped`: rows sorted by expert and multiplied
with `jax.lax.ragged_dot`, a grouped matmul over variable-size groups (the dropless mode, as in MegaBlocks,
Gale et al. 2022, arXiv 2211.15841). A Pallas grouped-matmul kernel will replace `ragged_dot` where it is
faster (the MoMa issue); on CPU XLA lowers `ragged_dot` to a dense product per group, so dropless costs about
E times its FLOPs there and is for correctness, not speed.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


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


def run_grouped(x: jax.Array, gate_up: jax.Array, down: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """x [N, d], rows sorted by expert with group_sizes [E] rows each -> [N, d]. Rows past sum(group_sizes)
  belong to no group and come out as zeros."""
  n_experts, d_model, _, d_ff = gate_up.shape
  w = gate_up.astype(x.dtype).reshape(n_experts, d_model, 2 * d_ff)
  h = jax.lax.ragged_dot(x, w, group_sizes).reshape(x.shape[0], 2, d_ff)
  h = jax.nn.silu(h[:, 0]) * h[:, 1]
  return jax.lax.ragged_dot(h, down.astype(x.dtype), group_sizes)
