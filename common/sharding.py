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
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

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


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
  """The device mesh of `mesh.shape` x `mesh.axes`; axes not named get size 1 so every rule resolves."""
  devices = jax.devices() if devices is None else devices
  sizes = resolve_mesh_shape(shape, axes, len(devices))
  return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), tuple(sizes))


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
