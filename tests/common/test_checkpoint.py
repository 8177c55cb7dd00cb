"""Checkpointer: a state saved on one mesh restores onto any other (the abstract state's shardings decide the
placement), with the same values and the same JSON record."""
import jax
import numpy as np
import pytest

from common import sharding
from common.configs.base import base_config, dense_model
from common.models import build_model
from common.train.checkpoint import Checkpointer
from common.tasks.base import Task
from common.train.loop import init_train_state
from common.train.optim import make_optimizer


def _task_and_optimizer():
  cfg = base_config()
  cfg.model = dense_model(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=128)
  task = Task(build_model=lambda: build_model(cfg.model, seed=0), loss_fn=None, data=None,
              train_flops_per_example=0.0, units_per_example=1)
  return task, make_optimizer(cfg.train)


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A state on the 8-device (4,2) fsdp x tensor mesh, with distinct non-zero values in every leaf, saved at
  step 7; returns (directory, host copy of the saved values)."""
  task, optimizer = _task_and_optimizer()
  mesh = sharding.make_mesh((4, 2), ("fsdp", "tensor"))
  _, _, state = init_train_state(task, optimizer, mesh)
  leaves, treedef = jax.tree.flatten(state)
  # Fill every leaf (optimizer moments and counters too) with values that differ per leaf and element.
  leaves = [jax.device_put((np.arange(x.size).reshape(x.shape) % 97 + i + 1).astype(x.dtype), x.sharding)
            for i, x in enumerate(leaves)]
  state = jax.tree.unflatten(treedef, leaves)
  embed = state["params"]["embed"]["embedding"]
  assert embed.sharding.shard_shape(embed.shape) != embed.shape  # really sharded when saved
  directory = str(tmp_path_factory.mktemp("ckpt"))
  ckpt = Checkpointer(directory, keep=2)
  ckpt.save(7, state, {"step": 7, "data_position": 56})
  ckpt.close()
  return directory, jax.tree.map(np.asarray, state)


@pytest.mark.parametrize("shape,axes,n_devices", [((1,), ("data",), 1), ((8,), ("data",), 8)])
def test_restore_onto_another_mesh_gives_the_saved_values(saved, shape, axes, n_devices):
  directory, expected = saved
  task, optimizer = _task_and_optimizer()
  mesh = sharding.make_mesh(shape, axes, devices=jax.devices()[:n_devices])
  _, _, target = init_train_state(task, optimizer, mesh)
  ckpt = Checkpointer(directory, keep=2)
  try:
    step, state, meta = ckpt.restore_latest(_abstract(target))
  finally:
    ckpt.close()
  assert step == 7
  assert meta == {"step": 7, "data_position": 56}
  for (path, got), want, tgt in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(expected),
                                    jax.tree.leaves(target)):
    assert got.sharding == tgt.sharding, jax.tree_util.keystr(path)  # placed on the new mesh
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=jax.tree_util.keystr(path))


def test_empty_directory_restores_nothing(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "none"), keep=2)
  try:
    assert ckpt.restore_latest({"x": jax.ShapeDtypeStruct((2,), np.float32)}) is None
  finally:
    ckpt.close()
