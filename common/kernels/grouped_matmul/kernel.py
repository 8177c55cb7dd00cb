"""Pallas grouped-matmul kernels (GPU, Triton lowering; `interpret=True` anywhere): `gmm` and its transposed
product `tgmm`, the three products of a dropless MoE layer's forward and backward passes.

Rows of lhs are sorted by group. `gmm` runs one program per (row tile, column tile) of the output; a row tile
may straddle group boundaries, so each program loops over the groups that intersect its rows (from a
tile -> first/last group map computed from group_sizes), multiplies the tile by that group's weights and
keeps the rows that belong to the group: straddling tiles cost one extra product per boundary, and every
output tile is written once by one program, so no masked stores or atomics are needed (MegaBlocks, Gale et
al. 2022, arXiv 2211.15841, sec. 5.1, builds the same block-sparse structure with a topology instead). A
tile outside every group does no work, and rows past sum(group_sizes) come out as zeros. `tgmm` runs
one program per (group, k tile, n tile) and loops over the row tiles of its group, zeroing the rows of
neighbouring groups. The wrappers pad every dimension to a multiple of its tile, so any size works.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from common.kernels.grouped_matmul.reference import accumulator, group_bounds


def default_blocks(dtype) -> tuple[int, int, int]:
  """(rows, contraction, columns) tiles, powers of two >= 16 for Triton. On an H100 with E=8, 16384 rows,
  k 512, n 4096 in bf16, fwd+bwd took 1.0 ms with (128, 64, 128), 1.2 ms with (128, 32, 128) and with
  (64, 32, 64). 4-byte inputs take (64, 32, 128): three pipeline stages of tgmm's [rows, k] and [rows, n]
  blocks must fit the H100's 227 KiB of shared memory, which (128, 32, 128) in f32 (240 KiB) does not."""
  return (128, 64, 128) if jnp.dtype(dtype).itemsize <= 2 else (64, 32, 128)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  extra = _cdiv(x.shape[axis], multiple) * multiple - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def tile_groups(starts: jax.Array, ends: jax.Array, n_tiles: int, block_m: int) -> tuple[jax.Array, jax.Array]:
  """(first [n_tiles], last [n_tiles]) int32: the range of groups whose rows meet each row tile (empty,
  last < first, for a tile past the groups; an empty group inside the range contributes no row)."""
  tile_start = jnp.arange(n_tiles, dtype=jnp.int32) * block_m
  first = jnp.sum(ends[None, :] <= tile_start[:, None], axis=1, dtype=jnp.int32)
  last = jnp.sum(starts[None, :] < tile_start[:, None] + block_m, axis=1, dtype=jnp.int32) - 1
  return first, jnp.minimum(last, starts.shape[0] - 1)


def _gmm_kernel(starts_ref, ends_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref, *, block_m, block_k,
                block_n, k_tiles, acc_dtype):
  tile, col = pl.program_id(0), pl.program_id(1)
  rows = tile * block_m + jnp.arange(block_m)

  def group_step(g, acc):
    start, end = starts_ref[g], ends_ref[g]

    def k_step(kb, part):
      x = lhs_ref[pl.ds(tile * block_m, block_m), pl.ds(kb * block_k, block_k)]  # [bm, bk]
      w = rhs_ref[g, pl.ds(kb * block_k, block_k), pl.ds(col * block_n, block_n)]  # [bk, bn]
      return part + jnp.dot(x, w, preferred_element_type=acc_dtype)

    part = jax.lax.fori_loop(0, k_tiles, k_step, jnp.zeros((block_m, block_n), acc_dtype))
    in_group = (rows >= start) & (rows < end)
    return jnp.where(in_group[:, None], part, acc)

  acc = jax.lax.fori_loop(first_ref[tile], last_ref[tile] + 1, group_step,
                          jnp.zeros((block_m, block_n), acc_dtype))
  out_ref[...] = acc.astype(out_ref.dtype)


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, block_m, block_k, block_n, acc_dtype):
  g, kb, col = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = starts_ref[g], ends_ref[g]
  first = (start // block_m).astype(jnp.int32)
  stop = jnp.where(end > start, (end + block_m - 1) // block_m, first).astype(jnp.int32)

  def m_step(t, acc):
    rows = t * block_m + jnp.arange(block_m)
    keep = ((rows >= start) & (rows < end))[:, None]
    x = jnp.where(keep, lhs_ref[pl.ds(t * block_m, block_m), pl.ds(kb * block_k, block_k)], 0)  # [bm, bk]
    dy = jnp.where(keep, grad_ref[pl.ds(t * block_m, block_m), pl.ds(col * block_n, block_n)], 0)  # [bm, bn]
    return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)

  acc = jax.lax.fori_loop(first, stop, m_step, jnp.zeros((block_k, block_n), acc_dtype))
  out_ref[...] = acc.astype(out_ref.dtype)


def _out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
  """The output's type, varying over the manual mesh axes of `inputs`: inside `jax.shard_map` pallas_call
  needs it (the attribute is `manual_axis_type` in jax 0.10, `vma` before)."""
  like = jax.typeof(sum(jnp.zeros_like(a, dtype=jnp.float32, shape=()) for a in inputs))
  for name in ("manual_axis_type", "vma"):
    value = getattr(like, name, None)
    if value is not None:
      try:
        return jax.ShapeDtypeStruct(shape, dtype, **{name: value})
      except TypeError:
        continue
  return jax.ShapeDtypeStruct(shape, dtype)


def _compiler_params(interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # only where the Triton backend is used
  return plgpu.CompilerParams(num_warps=4, num_stages=3)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, blocks: tuple[int, int, int] | None = None,
        interpret: bool = False) -> jax.Array:
  """lhs [m, k] (rows sorted by group) @ rhs[group] ([g, k, n]) -> [m, n] in lhs.dtype, f32 accumulation."""
  block_m, block_k, block_n = blocks or default_blocks(lhs.dtype)
  m, n = lhs.shape[0], rhs.shape[2]
  starts, ends = group_bounds(group_sizes)
  x = _pad_to(_pad_to(lhs, 0, block_m), 1, block_k)
  w = _pad_to(_pad_to(rhs.astype(lhs.dtype), 1, block_k), 2, block_n)
  m_tiles, k_tiles, n_tiles = x.shape[0] // block_m, x.shape[1] // block_k, w.shape[2] // block_n
  first, last = tile_groups(starts, ends, m_tiles, block_m)
  kernel = functools.partial(_gmm_kernel, block_m=block_m, block_k=block_k, block_n=block_n, k_tiles=k_tiles,
                             acc_dtype=accumulator(lhs.dtype))
  out = pl.pallas_call(
      kernel, grid=(m_tiles, n_tiles),
      in_specs=[pl.no_block_spec] * 6,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=_out_struct((x.shape[0], w.shape[2]), lhs.dtype, x, w, group_sizes),
      compiler_params=_compiler_params(interpret), interpret=interpret, name="grouped_matmul",
  )(starts, ends, first, last, x, w)
  return out[:m, :n]


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
         blocks: tuple[int, int, int] | None = None, interpret: bool = False) -> jax.Array:
  """Per-group lhs^T @ grad: lhs [m, k], grad [m, n] -> [g, k, n] in lhs.dtype (zeros for an empty group)."""
  block_m, block_k, block_n = blocks or default_blocks(lhs.dtype)
  k, n = lhs.shape[1], grad.shape[1]
  starts, ends = group_bounds(group_sizes)
  x = _pad_to(_pad_to(lhs, 0, block_m), 1, block_k)
  dy = _pad_to(_pad_to(grad.astype(lhs.dtype), 0, block_m), 1, block_n)
  grid = (group_sizes.shape[0], x.shape[1] // block_k, dy.shape[1] // block_n)
  kernel = functools.partial(_tgmm_kernel, block_m=block_m, block_k=block_k, block_n=block_n,
                             acc_dtype=accumulator(lhs.dtype))
  out = pl.pallas_call(
      kernel, grid=grid,
      in_specs=[pl.no_block_spec] * 4,
      out_specs=pl.BlockSpec((None, block_k, block_n), lambda g, i, j: (g, i, j)),
      out_shape=_out_struct((grid[0], x.shape[1], dy.shape[1]), lhs.dtype, x, dy, group_sizes),
      compiler_params=_compiler_params(interpret), interpret=interpret, name="grouped_matmul_transposed",
  )(starts, ends, x, dy)
  return out[:, :k, :n]
