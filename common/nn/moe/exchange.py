"""Rows of (token, expert) through their experts, on one device or with the experts split over a mesh axis.

The dropless token-choice layer and MoMa's expert choice both reduce to rows: row r asks expert[r] for its
SwiGLU of x[token[r]]. On one device the rows are sorted by expert and run as one grouped matmul. Under
`jax.shard_map` with the experts split over `expert_axis`, each row goes to the shard that owns its expert
with one all-to-all and its output comes back with another (GShard, Lepikhin et al. 2020, sec. 3.2).

Without a capacity, the rows one shard sends another have no bound below all of its rows, and an all-to-all
needs a static size. The buffers hold ceil(slack * R / ep) rows per destination (R: a shard's rows, ep: the
size of the axis), and when any shard of the axis would overflow one (a `pmax` decides, so the shards agree)
the layer takes an exact fallback for that call: every shard gathers the rows of the axis, runs its own
experts' rows, and a reduce-scatter hands each row's output back. Both branches give the single-device
numbers; the all-to-all moves about 2 * slack * R * d values per shard, the gather ep times the tokens plus
the rows. `jax.lax.ragged_all_to_all` would need no bound, but XLA:CPU does not implement it, so it could
not be tested here.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from common.nn.moe import experts as experts_lib

EXCHANGE_SLACK = 2.0  # all-to-all buffer rows per destination, as a multiple of an even split of the rows


def _run_sorted(rows: jax.Array, local_expert: jax.Array, gate_up, down, impl: str) -> jax.Array:
  """rows [N, d] through local_expert [N] (this shard's expert index; >= its expert count: none) -> [N, d]."""
  n_local = gate_up.shape[0]
  local_expert = jnp.minimum(local_expert, n_local)
  order = jnp.argsort(local_expert, stable=True)
  sizes = jnp.bincount(local_expert, length=n_local + 1)[:n_local].astype(jnp.int32)
  out = experts_lib.run_grouped(rows[order], gate_up, down, sizes, impl=impl)
  return jnp.zeros_like(out).at[order].set(out)


def _all_to_all_rows(x, token, expert, gate_up, down, impl, axis, per_dest):
  """The rows to their experts' shards and back in buffers of per_dest rows per destination (no overflow)."""
  n_local, d = gate_up.shape[0], x.shape[-1]
  ep = jax.lax.axis_size(axis)
  dest = jnp.minimum(expert // n_local, ep)  # ep: executed nowhere
  order = jnp.argsort(dest, stable=True)
  to = dest[order]
  counts = jnp.bincount(dest, length=ep + 1)
  start = jnp.cumsum(counts) - counts
  slot = jnp.where(to < ep, to * per_dest + jnp.arange(order.shape[0]) - start[to], ep * per_dest)
  send = jnp.zeros((ep * per_dest + 1, d), x.dtype).at[slot].set(x[token[order]])[:-1]
  local = jnp.where(to < ep, expert[order] - to * n_local, n_local).astype(jnp.int32)
  send_expert = jnp.full((ep * per_dest + 1,), n_local, jnp.int32).at[slot].set(local)[:-1]
  recv = jax.lax.all_to_all(send.reshape(ep, per_dest, d), axis, 0, 0, tiled=True)
  recv_expert = jax.lax.all_to_all(send_expert.reshape(ep, per_dest), axis, 0, 0, tiled=True)
  out = _run_sorted(recv.reshape(-1, d), recv_expert.reshape(-1), gate_up, down, impl)
  back = jax.lax.all_to_all(out.reshape(ep, per_dest, d), axis, 0, 0, tiled=True).reshape(-1, d)
  by_dest = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)])[slot]
  return jnp.zeros_like(by_dest).at[order].set(by_dest)


def _gathered_rows(x, token, expert, gate_up, down, impl, axis):
  """The fallback: the axis's tokens and rows gathered, this shard's experts' rows run, outputs scattered back."""
  n_local, n_tokens, n_rows = gate_up.shape[0], x.shape[0], token.shape[0]
  xs = jax.lax.all_gather(x, axis, tiled=True)
  source = jnp.arange(jax.lax.axis_size(axis) * n_rows) // n_rows
  tokens = jax.lax.all_gather(token, axis, tiled=True) + source * n_tokens
  local = jax.lax.all_gather(expert, axis, tiled=True) - jax.lax.axis_index(axis) * n_local
  local = jnp.where((local >= 0) & (local < n_local), local, n_local)
  out = _run_sorted(xs[tokens], local, gate_up, down, impl)  # rows of other shards' experts: zeros
  return jax.lax.psum_scatter(out, axis, scatter_dimension=0, tiled=True)


def run_rows(x: jax.Array, token: jax.Array, expert: jax.Array, gate_up: jax.Array, down: jax.Array, *,
             impl: str = "auto", expert_axis: str | None = None, slack: float = EXCHANGE_SLACK) -> jax.Array:
  """out [R, d] in x.dtype: expert[r]'s SwiGLU of x[token[r]], zeros where expert[r] names no expert (>= the
  experts of all shards). x [T, d] (this shard's tokens), token [R] and expert [R] int; gate_up/down: the
  experts of this shard (all of them without `expert_axis`); `impl`: the grouped-matmul implementation."""
  if expert_axis is None:
    return _run_sorted(x[token], expert, gate_up, down, impl)
  n_rows, n_local = token.shape[0], gate_up.shape[0]
  ep = jax.lax.axis_size(expert_axis)
  per_dest = min(n_rows, math.ceil(slack * n_rows / ep))
  dest = jnp.minimum(expert // n_local, ep)
  most = jax.lax.pmax(jnp.max(jnp.bincount(dest, length=ep + 1)[:ep]), expert_axis)
  return jax.lax.cond(most > per_dest,
                      lambda: _gathered_rows(x, token, expert, gate_up, down, impl, expert_axis),
                      lambda: _all_to_all_rows(x, token, expert, gate_up, down, impl, expert_axis, per_dest))
