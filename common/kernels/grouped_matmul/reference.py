"""Pure-jnp grouped matmuls: the oracles the Pallas kernel and the CPU fast path are tested against.

Rows of `lhs` are sorted by group: group g owns rows [sum(group_sizes[:g]), sum(group_sizes[:g + 1])), and rows
past sum(group_sizes) belong to no group. `gmm` is the forward product of a dropless MoE layer (MegaBlocks,
Gale et al. 2022, arXiv 2211.15841, sec. 5: one block-sparse product per expert weight); `tgmm` is its weight
gradient, a per-group lhs^T @ grad.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def accumulator(dtype) -> jnp.dtype:
  """Accumulation dtype of the products: float32 for bf16/f32 inputs, float64 for float64 (x64 tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """lhs [m, k] @ rhs[group of each row] ([g, k, n]) -> [m, n] in lhs.dtype; rows past the groups -> 0."""
  return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32),
                            preferred_element_type=accumulator(lhs.dtype)).astype(lhs.dtype)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Per-group lhs[rows of g]^T @ grad[rows of g]: lhs [m, k], grad [m, n] -> [g, k, n] in lhs.dtype (an empty
  group's block is zero). The ragged dimension is the contracted one."""
  dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                           lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  out = jax.lax.ragged_dot_general(lhs, grad.astype(lhs.dtype), group_sizes.astype(jnp.int32), dims,
                                   preferred_element_type=accumulator(lhs.dtype))
  return out.astype(lhs.dtype)


def group_bounds(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(starts [g], ends [g]) int32: the row range of each group."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return ends - group_sizes.astype(jnp.int32), ends


def gmm_loop(lhs, rhs, group_sizes) -> np.ndarray:
  """Slow float64 numpy loop over groups: the independent oracle of `gmm` for tests."""
  lhs, rhs, sizes = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64), np.asarray(group_sizes)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def tgmm_loop(lhs, grad, group_sizes) -> np.ndarray:
  """Slow float64 numpy loop over groups: the independent oracle of `tgmm` for tests."""
  lhs, grad, sizes = np.asarray(lhs, np.float64), np.asarray(grad, np.float64), np.asarray(group_sizes)
  out = np.zeros((len(sizes), lhs.shape[1], grad.shape[1]))
  start = 0
  for g, size in enumerate(sizes):
    out[g] = lhs[start:start + size].T @ grad[start:start + size]
    start += size
  return out
