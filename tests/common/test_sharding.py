"""common.sharding: the mesh from mesh.shape/mesh.axes and the logical-axis rule table (8 simulated CPUs)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from common import sharding
from common.config import ConfigError


def _mesh(**sizes):
  """An abstract mesh with the given axis sizes (the others 1), as make_mesh would lay it out."""
  return sharding.make_abstract_mesh(tuple(sizes.values()), tuple(sizes), n_devices=max(1, _prod(sizes)))


def _prod(sizes):
  out = 1
  for v in sizes.values():
    out *= v
  return out


def test_mesh_has_every_axis_and_uses_all_devices():
  mesh = sharding.make_mesh((2, 4), ("data", "tensor"))
  assert dict(mesh.shape) == {"data": 2, "tensor": 4, "fsdp": 1, "expert": 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_minus_one_takes_the_remaining_devices():
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh((-1, 2), ("fsdp", "tensor"))
  assert (mesh.shape["fsdp"], mesh.shape["tensor"]) == (4, 2)


def test_mesh_over_a_subset_of_devices():
  mesh = sharding.make_mesh((-1,), ("data",), devices=jax.devices()[:1])
  assert mesh.size == 1


@pytest.mark.parametrize("shape,axes", [
    ((3,), ("data",)),  # 3 != 8 devices
    ((-1, 3), ("data", "tensor")),  # 3 does not divide 8
    ((-1, -1), ("data", "tensor")),
    ((2, 4), ("data",)),  # dims and names disagree
])
def test_bad_mesh_shape_errors_name_mesh_shape(shape, axes):
  with pytest.raises(ConfigError, match=r"mesh\.shape"):
    sharding.make_mesh(shape, axes)


@pytest.mark.parametrize("axes", [("data", "data"), ("data", "model")])
def test_bad_mesh_axes_errors_name_mesh_axes(axes):
  with pytest.raises(ConfigError, match=r"mesh\.axes"):
    sharding.make_mesh((2, 4), axes)


def test_spec_shards_dims_by_their_rule():
  mesh = _mesh(fsdp=4, tensor=2)
  assert sharding.spec_for(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  assert sharding.spec_for(("vocab", "embed"), (128, 64), mesh) == P("tensor", "fsdp")


def test_spec_leaves_out_a_mesh_axis_that_does_not_divide_the_dim():
  mesh = _mesh(fsdp=4, tensor=2)
  assert sharding.spec_for(("embed", "heads"), (6, 3), mesh) == P(None, None)  # 4 !| 6, 2 !| 3
  # batch -> (data, fsdp, expert): data 2 divides 6, data x fsdp = 4 does not, so only data is used
  assert sharding.spec_for(("batch", "length"), (6, 5), _mesh(data=2, fsdp=2)) == P("data", None)
  assert sharding.spec_for(("batch", "length"), (8, 5), _mesh(data=2, fsdp=2)) == P(("data", "fsdp"), None)


def test_spec_never_uses_a_mesh_axis_twice():
  mesh = _mesh(data=2, tensor=4)
  # heads and mlp both map to 'tensor'; only the first dimension gets it
  spec = sharding.spec_for(("heads", "mlp"), (8, 8), mesh)
  assert spec == P("tensor", None)
  used = [a for dim in spec if dim for a in (dim if isinstance(dim, tuple) else (dim,))]
  assert len(used) == len(set(used))


def test_unnamed_and_unknown_logical_axes_are_replicated():
  mesh = _mesh(fsdp=4, tensor=2)
  assert sharding.spec_for((None, "layers", "no_such_axis"), (8, 8, 8), mesh) == P(None, None, None)


def test_batch_sharding_splits_rows_over_every_data_parallel_axis():
  mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  assert sharding.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
  assert sharding.data_parallel_size(mesh) == 4


# ------------------------------------------------------------------------------------ slices (mesh.dcn_shape)

def _devices_in_slices(n_slices, per_slice):
  """Stand-ins for the devices of a multi-slice run: what jax's mesh builders read of a device."""
  from types import SimpleNamespace
  return [SimpleNamespace(id=i, slice_index=i // per_slice, process_index=i // per_slice, platform="cpu",
                          device_kind="cpu") for i in range(n_slices * per_slice)]


@pytest.mark.parametrize("shape, axes, dcn, spanning", [
    ((4, 2), ("data", "tensor"), (2, 1), "data"),
    ((2, 4), ("fsdp", "tensor"), (1, 2), "tensor"),
])
def test_only_the_axis_of_dcn_shape_crosses_slices(shape, axes, dcn, spanning):
  """Of 2 slices of 4 devices: every slice of the mesh along the other axes sits in one slice, and the axis
  named in mesh.dcn_shape is split half and half between them."""
  devices = _devices_in_slices(2, 4)
  sizes = sharding.resolve_mesh_shape(shape, axes, len(devices))
  grid = sharding.hybrid_device_grid(sizes, axes, dcn, devices)
  assert grid.shape == tuple(sizes.values()) and sorted(d.id for d in grid.flat) == list(range(8))
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  along = list(sizes).index(spanning)
  halves = np.split(slice_of, 2, axis=along)
  assert (halves[0] == 0).all() and (halves[1] == 1).all()


@pytest.mark.parametrize("dcn, needle", [
    ((2,), "for each of"), ((0, 2), "for each of"), ((3, 1), "does not divide"), ((1, 1), "spans 1 slices"),
])
def test_bad_dcn_shape_names_mesh_dcn_shape(dcn, needle):
  devices = _devices_in_slices(2, 4)
  sizes = sharding.resolve_mesh_shape((4, 2), ("data", "tensor"), len(devices))
  with pytest.raises(ConfigError, match=r"config key 'mesh.dcn_shape'.*" + needle):
    sharding.hybrid_device_grid(sizes, ("data", "tensor"), dcn, devices)


def test_devices_in_several_slices_need_dcn_shape():
  with pytest.raises(ConfigError, match=r"config key 'mesh.dcn_shape': empty.*2 slices"):
    sharding.make_mesh((4, 2), ("data", "tensor"), devices=_devices_in_slices(2, 4))


def test_dcn_shape_on_one_process_is_one_slice():
  """Without slice_index (CPU) a process is a slice: this one-process run has one, so (1, 1) is its mesh
  and 2 slices are refused."""
  mesh = sharding.make_mesh((2, 4), ("data", "tensor"), dcn_shape=(1, 1))
  assert dict(mesh.shape) == {"data": 2, "tensor": 4, "fsdp": 1, "expert": 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ConfigError, match="mesh.dcn_shape.*1 processes"):
    sharding.make_mesh((2, 4), ("data", "tensor"), dcn_shape=(2, 1))
