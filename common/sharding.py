"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters carry logical axis names in their metadata (`axes=('embed', 'mlp')`); `RULES` says which mesh axes
shard each name. Changing the mesh changes placement only, never the numbers (beyond float rounding).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from common.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis name -> mesh axes that shard it (in order); None replicates.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "vocab": ("tensor",),
    "expert": ("expert",),
    "patch": None,
    "layers": None,
}


def resolve_mesh_shape(shape: Sequence[int], axes: Sequence[str], n_devices: int) -> dict[str, int]:
  """{mesh axis: size} for all of MESH_AXES (absent axes have size 1); one -1 takes the remaining devices."""
  shape, axes = tuple(int(s) for s in shape), tuple(axes)
  if len(shape) != len(axes):
    raise ConfigError(f"config key 'mesh.shape': {shape} has {len(shape)} dims but mesh.axes {axes} has {len(axes)}")
  unknown = [a for a in axes if a not in MESH_AXES]
  if unknown or len(set(axes)) != len(axes):
    raise ConfigError(f"config key 'mesh.axes': {axes} must be distinct names from {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ConfigError(f"config key 'mesh.shape': at most one -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or n_devices % known:
      raise ConfigError(f"config key 'mesh.shape': {shape} does not divide the {n_devices} devices")
    shape = tuple(n_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != n_devices:
    raise ConfigError(f"config key 'mesh.shape': {shape} needs {math.prod(shape)} devices, "
                      f"this run has {n_devices}")
  sizes = dict(zip(axes, shape))
  return {**sizes, **{a: 1 for a in MESH_AXES if a not in sizes}}


def _slices(devices) -> int:
  """How many slices (TPU pods joined over the data-centre network) `devices` span; 1 without slice_index."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def hybrid_device_grid(sizes: dict[str, int], axes: Sequence[str], dcn_shape: Sequence[int], devices) -> np.ndarray:
  """`devices` as an array of shape `sizes` (`resolve_mesh_shape`) whose axes span slices as `mesh.dcn_shape`
  says (how many slices each of `axes` spans; the product is the number of slices), by jax's
  `create_hybrid_device_mesh`: within a slice in the order of its interconnect, and only the axes that span
  slices cross the slower network. Without slice_index (GPU, CPU), each process counts as a slice."""
  dcn = tuple(int(d) for d in dcn_shape)
  if len(dcn) != len(tuple(axes)) or min(dcn) < 1:
    raise ConfigError(f"config key 'mesh.dcn_shape': {dcn} must give a positive number of slices for each of "
                      f"mesh.axes {tuple(axes)}")
  dcn_sizes = {**{a: 1 for a in sizes}, **dict(zip(axes, dcn))}
  if any(sizes[a] % dcn_sizes[a] for a in sizes):
    raise ConfigError(f"config key 'mesh.dcn_shape': {dcn} does not divide the mesh's axis sizes "
                      f"{tuple(sizes[a] for a in axes)} (mesh.shape)")
  by_process = not hasattr(devices[0], "slice_index")
  granules = len({getattr(d, "process_index" if by_process else "slice_index") for d in devices})
  if math.prod(dcn) != granules:
    raise ConfigError(f"config key 'mesh.dcn_shape': {dcn} spans {math.prod(dcn)} slices, but the devices are in "
                      f"{granules} {'processes' if by_process else 'slices'}")
  return mesh_utils.create_hybrid_device_mesh(tuple(sizes[a] // dcn_sizes[a] for a in sizes),
                                              tuple(dcn_sizes[a] for a in sizes), devices,
                                              process_is_granule=by_process)


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None, dcn_shape: Sequence[int] = ()) -> Mesh:
  """The device mesh of `mesh.shape` x `mesh.axes`, axes not named of size 1 so every rule resolves. One slice
  (`mesh.dcn_shape` empty): `jax.make_mesh`, which orders devices by the chips' interconnect; several:
  `hybrid_device_grid`. The axes are of the Auto type: shardings come from the rules, not from value types."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape, axes, len(devices))
  auto = (AxisType.Auto,) * len(sizes)
  if dcn_shape:
    return Mesh(hybrid_device_grid(sizes, axes, dcn_shape, devices), tuple(sizes), axis_types=auto)
  if _slices(devices) > 1:
    raise ConfigError(f"config key 'mesh.dcn_shape': empty, but the {len(devices)} devices span "
                      f"{_slices(devices)} slices; give how many slices each of mesh.axes {tuple(axes)} spans")
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=auto, devices=devices)


def make_abstract_mesh(shape: Sequence[int], axes: Sequence[str], n_devices: int) -> AbstractMesh:
  """A mesh of `n_devices` that need not exist (for planning runs bigger than this machine)."""
  sizes = resolve_mesh_shape(shape, axes, n_devices)
  return AbstractMesh(tuple(sizes.values()), tuple(sizes))


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh) -> P:
  """PartitionSpec for an array of `shape` with logical axis names; a mesh axis that does not divide
  the dimension, or is already used by an earlier dimension, is left out (that dim is replicated there)."""
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape):
    axes = []
    for mesh_axis in (RULES.get(name) or ()) if name else ():
      size = mesh.shape[mesh_axis]
      if mesh_axis in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in axes) * size) == 0:
        axes.append(mesh_axis)
    used.update(axes)
    out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def _logical_axes(variable: nnx.Variable) -> tuple:
  value = variable.get_value() if hasattr(variable, "get_value") else variable.value
  return variable.get_metadata().get("axes") or (None,) * np.ndim(value)


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings for an nnx.State (abstract or concrete) from each Variable's `axes` metadata."""
  def one(v):
    value = v.get_value() if hasattr(v, "get_value") else v.value
    return v.replace(NamedSharding(mesh, spec_for(_logical_axes(v), value.shape, mesh)))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch rows split over every data-parallel axis; other dims replicated."""
  axes = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1)
  first = axes if len(axes) > 1 else (axes[0] if axes else None)
  return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in RULES["batch"])
