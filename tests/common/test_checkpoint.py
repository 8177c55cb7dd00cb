"""Checkpointer: a state saved on one mesh restores onto any other (the abstract state's shardings decide the
placement), with the same values and the same JSON record; bytes that changed on disk are caught by the
record's checksums and that checkpoint set aside, while an I/O error surfaces and leaves it alone."""
import errno
import json
import os
import pathlib
import shutil

import chex
import jax
import numpy as np
import pytest

from common import sharding
from common.configs.base import base_config, dense_model
from common.models import build_model
from common.config import ConfigError
from common.train.checkpoint import Checkpointer, state_checksums
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


@pytest.fixture(scope="module")
def two_steps_saved(tmp_path_factory):
  """Checkpoints at steps 1 and 2 (different values) of the (4,2) fsdp x tensor state: (directory, abstract
  state, host values of step 1)."""
  task, optimizer = _task_and_optimizer()
  _, _, state = init_train_state(task, optimizer, sharding.make_mesh((4, 2), ("fsdp", "tensor")))
  directory = str(tmp_path_factory.mktemp("two_steps") / "ckpt")
  ckpt = Checkpointer(directory, keep=5, async_save=False)
  ckpt.save(1, state, {"step": 1, "data_position": 8})
  ckpt.save(2, jax.tree.map(lambda x: x + 1, state), {"step": 2, "data_position": 16})
  ckpt.close()
  return directory, _abstract(state), jax.tree.map(np.asarray, state)


@pytest.fixture
def two_steps(two_steps_saved, tmp_path):
  """A copy of `two_steps_saved` for one test to damage."""
  directory, abstract, step1 = two_steps_saved
  copy = str(tmp_path / "ckpt")
  shutil.copytree(directory, copy)
  return copy, abstract, step1


def _largest_state_file(step_dir):
  return max((p for p in pathlib.Path(step_dir, "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_flipped_bytes_refuse_the_checkpoint_and_the_previous_one_is_used(two_steps):
  directory, abstract, step1 = two_steps
  victim = _largest_state_file(os.path.join(directory, "2"))
  data = bytearray(victim.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
  victim.write_bytes(bytes(data))  # a 4 KiB flip orbax itself reads back without complaint
  ckpt = Checkpointer(directory, keep=5)
  try:
    step, state, meta = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  assert step == 1 and meta == {"step": 1, "data_position": 8}
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), step1)
  assert sorted(os.listdir(directory))[0] == "1" and any(d.startswith("2.corrupt-") for d in os.listdir(directory))


def test_an_io_error_surfaces_and_leaves_the_checkpoint_alone(two_steps, monkeypatch):
  directory, abstract, _ = two_steps
  before = sorted(os.listdir(directory))
  ckpt = Checkpointer(directory, keep=5)

  def failing_restore(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error", os.path.join(directory, "2", "state"))

  monkeypatch.setattr(ckpt.manager, "restore", failing_restore)
  try:
    with pytest.raises(OSError, match="Input/output error"):
      ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  assert sorted(os.listdir(directory)) == before


def test_a_checkpoint_of_another_state_tree_is_refused_as_such(two_steps):
  directory, abstract, _ = two_steps
  other = {**abstract, "extra": jax.ShapeDtypeStruct((), np.int32, sharding=abstract["step"].sharding)}
  before = sorted(os.listdir(directory))
  ckpt = Checkpointer(directory, keep=5)
  try:
    with pytest.raises(ConfigError, match="step 2 .* is intact but holds another training state .*extra"):
      ckpt.restore_latest(other)
  finally:
    ckpt.close()
  assert sorted(os.listdir(directory)) == before


def test_checksums_do_not_depend_on_the_mesh(saved):
  """The record's checksums are of the values: a state placed on 1 device sums to what the 8-device one did."""
  directory, expected = saved
  one = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), expected)
  with open(os.path.join(directory, "7", "meta", "metadata")) as f:
    recorded = json.load(f)["checksums"]
  assert state_checksums(one) == recorded
  flipped = jax.tree.map(np.copy, expected)
  flipped["params"]["embed"]["embedding"].value.view(np.uint32)[3, 5] ^= 1 << 7
  assert state_checksums(jax.tree.map(jax.numpy.asarray, flipped)) != recorded


def test_a_file_that_does_not_decode_refuses_the_checkpoint(two_steps):
  """Garbage in one data file: TensorStore reports it (FAILED_PRECONDITION) before any checksum is computed."""
  directory, abstract, _ = two_steps
  victim = _largest_state_file(os.path.join(directory, "2"))
  victim.write_bytes(b"\xde\xad" * (victim.stat().st_size // 2 + 1))
  ckpt = Checkpointer(directory, keep=5)
  try:
    assert ckpt.restore_latest(abstract)[0] == 1
  finally:
    ckpt.close()


def test_a_checkpoint_from_before_skipped_steps_restores_it_as_zero(two_steps_saved, tmp_path):
  _, abstract, values = two_steps_saved
  # The state as the trainer saved it before `skipped_steps` existed.
  old = {k: jax.tree.map(lambda v, a: jax.device_put(v, a.sharding), values[k], abstract[k])
         for k in values if k != "skipped_steps"}
  ckpt = Checkpointer(str(tmp_path), keep=2, async_save=False)
  try:
    ckpt.save(3, old, {"step": 3, "data_position": 24})
    step, restored, _ = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  assert step == 3 and int(restored["skipped_steps"]) == 0
  assert restored["skipped_steps"].sharding == abstract["skipped_steps"].sharding
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored["params"]), values["params"])
