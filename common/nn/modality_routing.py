"""Tokens grouped by modality, for layers whose weights are untied per modality.

Mixture-of-Transformers (Liang et al. 2024, arXiv 2411.04996, sec. 2.2, Algorithm 1) gives every modality
its own projections, norms and FFN: each token is multiplied by its own modality's weights only, so a layer
costs the FLOPs of a dense one. The tokens of a batch are flattened, stably sorted by modality once
(`group_by_modality`: a counting sort, O(tokens x modalities)), every untied matmul runs on the sorted rows as
one grouped matmul (`ModalityLinear`, `common.kernels.grouped_matmul`: one weight per contiguous group of
rows) and the rows go back to their places once (`from_groups`). Both moves are permutation gathers whose
gradient is the gather by the inverse permutation (no scatter-add). (MoMa's expert groups,
`common.nn.moe.modality_groups`, need no separate sort: their expert-choice selection already yields
expert-sorted rows.)

Why not the two simpler exact formulations (timed in `bench/mot_step.py`): masking (every modality's weight
on every token, then a select) and per-modality gathers into static buffers (each as large as the batch,
since one modality may fill it) both cost n_modalities x the FLOPs.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from common.kernels.grouped_matmul import grouped_matmul


class ModalityGroups(NamedTuple):
  """A stable sort of N flattened tokens by modality. Sorted row r holds token `order[r]`; token i sits at
  sorted row `inverse[i]`; modality g owns the rows [sum(sizes[:g]), sum(sizes[:g + 1]))."""
  order: jax.Array     # [N] int32
  inverse: jax.Array   # [N] int32
  sizes: jax.Array     # [n_modalities] int32
  modality: jax.Array  # [N] int32, the modality of each sorted row (non-decreasing)

  @property
  def n_modalities(self) -> int:
    return self.sizes.shape[0]


def group_by_modality(modality: jax.Array, n_modalities: int) -> ModalityGroups:
  """Groups of the tokens of `modality` (int, any shape; flattened row-major). Values outside
  [0, n_modalities) are clipped to it (callers validate their modality count against the data's)."""
  flat = jnp.clip(modality.reshape(-1).astype(jnp.int32), 0, n_modalities - 1)
  one_hot = flat[:, None] == jnp.arange(n_modalities, dtype=jnp.int32)  # [N, M]
  sizes = jnp.sum(one_hot, axis=0, dtype=jnp.int32)
  starts = jnp.cumsum(sizes) - sizes
  # Rank of each token among the earlier tokens of its modality: stable by construction.
  rank = jnp.sum(jnp.where(one_hot, jnp.cumsum(one_hot, axis=0, dtype=jnp.int32), 0), axis=1) - 1
  inverse = starts[flat] + rank
  order = jnp.zeros_like(inverse).at[inverse].set(jnp.arange(flat.shape[0], dtype=jnp.int32),
                                                  unique_indices=True)
  return ModalityGroups(order=order, inverse=inverse, sizes=sizes, modality=flat[order])


@jax.custom_vjp
def _permute_rows(x: jax.Array, index: jax.Array, inverse_index: jax.Array) -> jax.Array:
  """x[index] for a permutation `index` whose inverse is `inverse_index`."""
  return jnp.take(x, index, axis=0, unique_indices=True, indices_are_sorted=False)


def _permute_rows_fwd(x, index, inverse_index):
  return _permute_rows(x, index, inverse_index), (index, inverse_index)


def _permute_rows_bwd(residuals, grad):
  index, inverse_index = residuals
  return _permute_rows(grad, inverse_index, index), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def to_groups(x: jax.Array, groups: ModalityGroups, batch_dims: int = 2) -> jax.Array:
  """x [*batch (batch_dims axes), *features] -> sorted rows [N, *features]."""
  rows = x.reshape(-1, *x.shape[batch_dims:])
  return _permute_rows(rows, groups.order, groups.inverse)


def from_groups(rows: jax.Array, groups: ModalityGroups, batch_shape: Sequence[int]) -> jax.Array:
  """Sorted rows [N, *features] -> [*batch_shape, *features] in the tokens' own places."""
  x = _permute_rows(rows, groups.inverse, groups.order)
  return x.reshape(*batch_shape, *rows.shape[1:])


def per_row(table: jax.Array, groups: ModalityGroups | None, ndim: int = 2) -> jax.Array:
  """table [n_modalities, dim] -> each sorted row's own modality's entry, broadcastable against rows of
  `ndim` axes ([N, 1, ..., dim]); with one modality (or no groups) just [dim]."""
  if table.shape[0] == 1 or groups is None:
    return table[0]
  # A one-hot product rather than a gather: its gradient is a product too, not a scatter-add over N rows.
  one_hot = jax.nn.one_hot(groups.modality, table.shape[0], dtype=table.dtype)
  rows = jnp.dot(one_hot, table, precision=jax.lax.Precision.HIGHEST)
  return rows.reshape(rows.shape[0], *(1,) * (ndim - 2), rows.shape[1])


def grouped_linear(rows: jax.Array, kernel: jax.Array, groups: ModalityGroups | None, *,
                   impl: str = "auto") -> jax.Array:
  """Sorted rows [N, in] @ the kernel [n_modalities, in, out] of each row's modality -> [N, out]. One
  modality (or no groups): a plain dense product, bit-for-bit the dense layer's."""
  if kernel.shape[0] == 1 or groups is None:
    return jnp.dot(rows, kernel[0])
  return grouped_matmul(rows, kernel, groups.sizes, impl=impl)


class ModalityLinear(nnx.Module):
  """y = x @ W[modality] over sorted rows, W of shape [n_modalities, in_dim, *out_shape]; stored f32,
  computed in `dtype`. Each modality's weight is initialised as `common.nn.Linear` initialises its one."""

  def __init__(self, n_modalities: int, in_dim: int, out_shape: int | Sequence[int], *,
               axes: Sequence[str | None], rngs: nnx.Rngs, dtype=jnp.float32, init_scale: float = 1.0):
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    std = init_scale / math.sqrt(in_dim)
    w = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (n_modalities, in_dim, *out_shape),
                                          jnp.float32)
    self.kernel = nnx.Param(w, axes=(None, *axes))
    self.out_shape = out_shape
    self.dtype = dtype

  def weight(self) -> jax.Array:
    """[n_modalities, in_dim, prod(out_shape)] in the compute dtype."""
    w = self.kernel[...].astype(self.dtype)
    return w.reshape(w.shape[0], w.shape[1], -1)

  def __call__(self, rows: jax.Array, groups: ModalityGroups | None, *, impl: str = "auto") -> jax.Array:
    y = grouped_linear(rows.astype(self.dtype), self.weight(), groups, impl=impl)
    return y.reshape(rows.shape[0], *self.out_shape)


class ModalityRMSNorm(nnx.Module):
  """RMSNorm with one scale per modality (statistics in f32), over sorted rows [N, ..., dim]."""

  def __init__(self, n_modalities: int, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, axes=("embed",)):
    self.scale = nnx.Param(jnp.ones((n_modalities, dim), jnp.float32), axes=(None, *axes))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, rows: jax.Array, groups: ModalityGroups | None) -> jax.Array:
    x32 = rows.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * per_row(self.scale[...], groups, rows.ndim)).astype(self.dtype)
