"""`grouped_matmul`: the grouped matmul of dropless MoE layers, with one custom VJP over every implementation.

Implementations (`impl`):
  * 'pallas': the Pallas kernels of `kernel.py`, compiled (Triton on GPU);
  * 'interpret': the same kernels in Pallas interpret mode (any backend; for tests, not for speed);
  * 'reference': `jax.lax.ragged_dot` (XLA:TPU lowers it to its own grouped-matmul kernel; XLA:CPU to a dense
    product per group, about g times the FLOPs);
  * 'xla_tiles': the fast formulation for XLA:CPU (measured in `bench/grouped_matmul.py`): each group is cut
    into row tiles, full tiles of `big` rows then a tail of `small`-row tiles, and a loop with a dynamic trip
    count runs one dense [tile, k] @ [k, n] product per tile, so the work is the true FLOPs plus less than one
    small tile per group;
  * 'auto': 'pallas' on GPU, 'reference' on TPU, 'xla_tiles' elsewhere.
The backward pass is the same grouped product against rhs^T (d lhs) and the transposed product `tgmm`
(d rhs), computed by the same implementation. Under a mesh whose batch axes are not already manual, the
rows are split over them in `jax.shard_map` (each shard's group sizes recomputed from the global ones), so
the kernel runs under any mesh; the weight gradient is summed over the shards by shard_map's transpose.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from common.kernels.grouped_matmul import kernel, reference
from common.sharding import RULES

IMPLS = ("auto", "pallas", "interpret", "reference", "xla_tiles")
DEFAULT_TILES = (512, 64)  # xla_tiles (big, small) row tiles: the fastest of bench/grouped_matmul.py on CPU


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"grouped matmul impl must be one of {IMPLS}, got '{impl}'")
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  return {"gpu": "pallas", "tpu": "reference"}.get(backend, "xla_tiles")


# --------------------------------------------------------------------------------- the XLA:CPU formulation

def _visit_table(counts, bases, tile: int, n_max: int):
  """Visits of a tile loop: (group [n_max], first row [n_max], number of visits). Group g has counts[g]
  visits at rows bases[g], bases[g] + tile, ...; the table lists them in group order."""
  cum = jnp.cumsum(counts)
  v = jnp.arange(n_max, dtype=jnp.int32)
  group = jnp.minimum(jnp.sum(cum[None, :] <= v[:, None], axis=1), counts.shape[0] - 1).astype(jnp.int32)
  row = bases[group] + (v - (cum[group] - counts[group])) * tile
  return group, row, cum[-1]


def _tile_loops(group_sizes, m: int, tiles: tuple[int, int]):
  """[(tile, masked, group, row, n_visits, ends)] for two loops: the full `big` tiles of each group, then its
  tail in `small` tiles, masked to the group's rows (< one small tile of waste per group)."""
  big, small = tiles
  starts, ends = reference.group_bounds(group_sizes)
  sizes = ends - starts
  g = sizes.shape[0]
  n_big = sizes // big if m >= big else jnp.zeros_like(sizes)
  small = min(small, m)
  n_small = (sizes - n_big * big + small - 1) // small
  loops = []
  if m >= big:
    loops.append((big, False, *_visit_table(n_big, starts, big, m // big), ends))
  max_small = min(-(-m // small) + g - 1, g * -(-big // small))
  loops.append((small, True, *_visit_table(n_small, starts + n_big * big, small, max_small), ends))
  return loops


def _zeros_varying_like(shape, dtype, *inputs):
  """Zeros that vary over the same manual mesh axes as `inputs` (a loop carry inside shard_map must)."""
  seed = sum(jnp.zeros_like(a, dtype=dtype, shape=()) for a in inputs)  # zeros_like keeps the varying axes
  return jnp.broadcast_to(seed, shape)


def _rows(x, row, tile, m):
  """tile rows of x from `row`, the window moved back to stay inside x: (window [tile, ...], its first row)."""
  first = jnp.minimum(row, m - tile)
  return jax.lax.dynamic_slice_in_dim(x, first, tile), first


def _gmm_tiles(lhs, rhs, group_sizes, tiles, transpose_rhs=False):
  """lhs [m, k] @ rhs[g] ([g, k, n], or [g, n, k] used transposed) -> [m, n]."""
  m = lhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  contract = (((1,), (1,) if transpose_rhs else (0,)), ((), ()))
  acc_dtype = reference.accumulator(lhs.dtype)
  out = _zeros_varying_like((m, n), lhs.dtype, lhs, rhs, group_sizes)
  for tile, masked, group, row, n_visits, ends in _tile_loops(group_sizes, m, tiles):
    def step(i, out, tile=tile, masked=masked, group=group, row=row, ends=ends):
      x, first = _rows(lhs, row[i], tile, m)
      y = jax.lax.dot_general(x, rhs[group[i]], contract, preferred_element_type=acc_dtype).astype(out.dtype)
      if masked:
        rows = first + jnp.arange(tile)
        keep = (rows >= row[i]) & (rows < ends[group[i]])
        y = jnp.where(keep[:, None], y, jax.lax.dynamic_slice_in_dim(out, first, tile))
      return jax.lax.dynamic_update_slice_in_dim(out, y, first, 0)
    out = jax.lax.fori_loop(0, n_visits, step, out)
  return out


def _tgmm_tiles(lhs, grad, group_sizes, tiles):
  """Per-group lhs^T @ grad: [m, k], [m, n] -> [g, k, n]."""
  m = lhs.shape[0]
  acc_dtype = reference.accumulator(lhs.dtype)
  acc = _zeros_varying_like((group_sizes.shape[0], lhs.shape[1], grad.shape[1]), acc_dtype, lhs, grad, group_sizes)
  for tile, masked, group, row, n_visits, ends in _tile_loops(group_sizes, m, tiles):
    def step(i, acc, tile=tile, masked=masked, group=group, row=row, ends=ends):
      x, first = _rows(lhs, row[i], tile, m)
      dy, _ = _rows(grad, row[i], tile, m)
      if masked:
        rows = first + jnp.arange(tile)
        keep = ((rows >= row[i]) & (rows < ends[group[i]]))[:, None]
        x, dy = jnp.where(keep, x, 0), jnp.where(keep, dy, 0)
      prod = jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)
      return acc.at[group[i]].add(prod)
    acc = jax.lax.fori_loop(0, n_visits, step, acc)
  return acc.astype(lhs.dtype)


# ---------------------------------------------------------------------------------- dispatch + custom VJP

def _forward(lhs, rhs, group_sizes, impl, tiling):
  if impl in ("pallas", "interpret"):
    return kernel.gmm(lhs, rhs, group_sizes, blocks=tiling, interpret=impl == "interpret")
  if impl == "xla_tiles":
    return _gmm_tiles(lhs, rhs.astype(lhs.dtype), group_sizes, tiling or DEFAULT_TILES)
  return reference.gmm(lhs, rhs, group_sizes)


def _transposed(lhs, grad, group_sizes, impl, tiling):
  if impl in ("pallas", "interpret"):
    return kernel.tgmm(lhs, grad, group_sizes, blocks=tiling, interpret=impl == "interpret")
  if impl == "xla_tiles":
    return _tgmm_tiles(lhs, grad.astype(lhs.dtype), group_sizes, tiling or DEFAULT_TILES)
  return reference.tgmm(lhs, grad, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, rhs, group_sizes, impl, tiling):
  return _forward(lhs, rhs, group_sizes, impl, tiling)


def _gmm_fwd(lhs, rhs, group_sizes, impl, tiling):
  return _forward(lhs, rhs, group_sizes, impl, tiling), (lhs, rhs, group_sizes)


def _gmm_bwd(impl, tiling, residuals, grad):
  lhs, rhs, group_sizes = residuals
  grad = grad.astype(lhs.dtype)
  if impl == "xla_tiles":
    d_lhs = _gmm_tiles(grad, rhs.astype(lhs.dtype), group_sizes, tiling or DEFAULT_TILES, transpose_rhs=True)
  else:
    d_lhs = _forward(grad, jnp.swapaxes(rhs, 1, 2), group_sizes, impl, tiling)
  d_rhs = _transposed(lhs, grad, group_sizes, impl, tiling).astype(rhs.dtype)
  return d_lhs, d_rhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def local_group_sizes(group_sizes: jax.Array, first_row, n_rows: int) -> jax.Array:
  """Group sizes of the rows [first_row, first_row + n_rows) of a sorted global layout."""
  starts, ends = reference.group_bounds(group_sizes)
  return (jnp.clip(ends - first_row, 0, n_rows) - jnp.clip(starts - first_row, 0, n_rows)).astype(jnp.int32)


def _local_gmm(lhs, rhs, group_sizes, impl, tiling):
  """`_gmm` on this device's arrays. Inside shard_map, lhs and rhs are first made to vary over the same
  manual mesh axes (adding a zero scalar of the other), as the custom VJP's cotangents do; the transpose of
  that add sums a cotangent over the axes its input did not vary on (the weight gradient over token shards)."""
  if jax.sharding.get_abstract_mesh().manual_axes:
    lhs, rhs = lhs + jnp.zeros_like(rhs, lhs.dtype, shape=()), rhs + jnp.zeros_like(lhs, rhs.dtype, shape=())
  return _gmm(lhs, rhs, group_sizes, impl, tiling)


def _row_axes(mesh) -> tuple[str, ...]:
  if mesh is None or mesh.empty:
    return ()
  manual = set(mesh.manual_axes)
  return tuple(a for a in RULES["batch"] if a in mesh.axis_names and mesh.shape[a] > 1 and a not in manual)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
                   tiling: tuple[int, ...] | None = None) -> jax.Array:
  """lhs [m, k] with rows sorted by group, group g owning group_sizes[g] rows, @ rhs[g] ([g, k, n]) -> [m, n]
  in lhs.dtype; rows past sum(group_sizes) -> 0. Differentiable in lhs and rhs. `tiling`: kernel blocks
  (rows, k, n) for 'pallas'/'interpret', (big, small) row tiles for 'xla_tiles'."""
  impl = resolve_impl(impl)
  group_sizes = group_sizes.astype(jnp.int32)
  tiling = tuple(tiling) if tiling else None
  mesh = jax.sharding.get_abstract_mesh()
  axes = _row_axes(mesh)
  n_shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  if n_shards == 1 or lhs.shape[0] % n_shards:
    return _local_gmm(lhs, rhs, group_sizes, impl, tiling)
  rows_per_shard = lhs.shape[0] // n_shards

  def body(x, w, sizes):
    shard = 0
    for a in axes:
      shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
    return _local_gmm(x, w, local_group_sizes(sizes, shard * rows_per_shard, rows_per_shard), impl, tiling)

  spec = P(axes, None)
  check_vma = impl not in ("pallas", "interpret")  # Pallas' interpreter fails jax 0.10's varying-axes check
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if any(types[a] == jax.sharding.AxisType.Explicit for a in axes):
    lhs, rhs, group_sizes = jax.reshard(lhs, spec), jax.reshard(rhs, P()), jax.reshard(group_sizes, P())
  return jax.shard_map(body, in_specs=(spec, P(), P()), out_specs=spec, axis_names=set(axes),
                       check_vma=check_vma)(lhs, rhs, group_sizes)


# ------------------------------------------------------------------------------------ accelerator check

def self_check(impl: str = "pallas", *, m: int = 4000, k: int = 512, n: int = 1024, groups: int = 8,
               dtype=jnp.float32, tiling: tuple[int, ...] | None = None, repeats: int = 5, seed: int = 0) -> dict:
  """Compares `impl` with the ragged_dot reference on random sorted inputs (one empty group, rows past the
  groups): max abs errors of the output, d lhs and d rhs, each also relative to the reference's largest
  magnitude, and the median seconds of one jitted fwd+bwd of each (for a GPU check script; on CPU use
  bench/grouped_matmul.py for speed). On an H100 (jax 0.11.2, bf16, m 16384, k 512, n 4096) the kernel
  took 1.0 ms and ragged_dot 7.2 ms."""
  rng = np.random.default_rng(seed)
  sizes = rng.multinomial(m - m // 16, np.full(groups, 1.0 / groups))
  sizes[groups // 2] = 0
  group_sizes = jnp.asarray(sizes, jnp.int32)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(groups, k, n)) / np.sqrt(k), dtype)
  cot = jnp.asarray(rng.normal(size=(m, n)), dtype)

  def fwd_bwd(fn):
    def run(x, w):
      y, vjp = jax.vjp(lambda a, b: fn(a, b, group_sizes), x, w)
      return (y, *vjp(cot))
    return jax.jit(run)

  runs = {impl: fwd_bwd(functools.partial(grouped_matmul, impl=impl, tiling=tiling)),
          "reference": fwd_bwd(reference.gmm)}
  outs, seconds = {}, {}
  for name, run in runs.items():
    outs[name] = jax.block_until_ready(run(lhs, rhs))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(run(lhs, rhs))
      times.append(time.perf_counter() - t0)
    seconds[name] = float(np.median(times))
  report = dict(impl=resolve_impl(impl), backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                shape=dict(m=m, k=k, n=n, groups=groups), dtype=jnp.dtype(dtype).name)
  for name, got, want in zip(("out", "dlhs", "drhs"), outs[impl], outs["reference"]):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    report[f"max_abs_err_{name}"] = float(np.max(np.abs(got - want)))
    report[f"rel_err_{name}"] = report[f"max_abs_err_{name}"] / max(float(np.max(np.abs(want))), 1e-30)
  return dict(report, seconds=seconds[impl], reference_seconds=seconds["reference"])
