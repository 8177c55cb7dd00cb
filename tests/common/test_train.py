"""The training loop in-process (8 simulated CPU devices): a tiny dense LM on synthetic batches through
`common.train.loop.train`, the losses read back from metrics.jsonl and the parameters from the checkpoints.

Facts checked: the mesh changes placement, never the numbers; gradient accumulation equals one big batch;
a non-finite loss or update stops the run naming its step (or, with nan_policy='skip', leaves the state as it
was, counts the step in `skipped_steps` and reports the learning rate the optimizer then applies).
"""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from common import sharding
from common.configs.base import base_config, dense_model
from common.models import build_model
from common.train.checkpoint import Checkpointer
from common.tasks.lm import next_token_loss
from common.tasks.base import Task
from common.train.loop import train
from common.config import ConfigError
from common.train.optim import learning_rate_schedule, make_optimizer
from common.train.step import init_state

VOCAB, SEQ, BATCH = 128, 32, 8
MARKER = 2  # a token id the synthetic batches never contain; the NaN task's loss is NaN when it appears


class TinyData:
  """Deterministic synthetic packed rows: the batch at a data position depends on the position only. Each row
  holds two documents and trailing padding (segment id 0, loss mask 0)."""

  def __init__(self, bad_steps=()):
    self.bad_positions = {(s - 1) * BATCH for s in bad_steps}

  def train_batch(self, position):
    rng = np.random.default_rng(position)
    targets = rng.integers(3, VOCAB, (BATCH, SEQ), dtype=np.int32)
    cut, pad = SEQ // 2, SEQ - 4
    segment_ids = np.where(np.arange(SEQ) < cut, 1, 2).astype(np.int32)
    segment_ids = np.broadcast_to(np.where(np.arange(SEQ) < pad, segment_ids, 0), (BATCH, SEQ)).copy()
    positions = np.broadcast_to(np.where(np.arange(SEQ) < cut, np.arange(SEQ), np.arange(SEQ) - cut),
                                (BATCH, SEQ)).astype(np.int32).copy()
    inputs = np.where(positions == 0, 0, np.roll(targets, 1, axis=1)).astype(np.int32)
    targets = np.where(segment_ids > 0, targets, 0).astype(np.int32)
    if position in self.bad_positions:
      inputs[0, 1] = MARKER
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions,
            "loss_mask": (segment_ids > 0).astype(np.float32)}

  def eval_batches(self, n):
    """No eval set: each run then compiles no eval step (eval lines are checked in test_train_cli.py)."""
    return iter(())


def nan_on_marker_loss(model, batch):
  total, weight, sums = next_token_loss(model, batch)
  return jnp.where(jnp.any(batch["inputs"] == MARKER), jnp.nan, total), weight, sums


def make_cfg(steps=3, mesh_shape=(-1,), mesh_axes=("data",), **train_overrides):
  cfg = base_config()
  cfg.model = dense_model(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=VOCAB)
  cfg.data.seq_len = SEQ
  cfg.train.update(dict(steps=steps, batch_size=BATCH, warmup_steps=1, **train_overrides))
  cfg.checkpoint.update(dict(every_steps=1000, async_save=False))
  cfg.log.update(dict(every_steps=1, progress="lines"))
  cfg.eval.update(dict(every_steps=1000, batches=1))
  cfg.mesh.update(dict(shape=mesh_shape, axes=mesh_axes))
  return cfg


def make_task(cfg, bad_steps=()):
  return Task(build_model=lambda: build_model(cfg.model, seed=cfg.train.seed),
              loss_fn=nan_on_marker_loss if bad_steps else next_token_loss, data=TinyData(bad_steps),
              train_flops_per_example=1e6, units_per_example=SEQ)


def train_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if "loss" in r]


def host_abstract_state(cfg, task):
  """The abstract training state on one device: what a checkpoint of any mesh is restored onto here."""
  one = NamedSharding(sharding.make_mesh((1,), ("data",), devices=jax.devices()[:1]), P())
  optimizer = make_optimizer(cfg.train)
  shapes = jax.eval_shape(lambda: init_state(nnx.split(task.build_model(), nnx.Param)[1], optimizer))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), shapes)


def saved_state(workdir, cfg, task, step):
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=100)
  try:
    out = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(host_abstract_state(cfg, task))))
    return jax.tree.map(np.asarray, out["state"])
  finally:
    ckpt.close()


MESHES = {
    "1 device": ((1,), ("data",), 1),
    "(8,) data": ((8,), ("data",), 8),
    "(2,4) data x tensor": ((2, 4), ("data", "tensor"), 8),
    "(4,2) fsdp x tensor": ((4, 2), ("fsdp", "tensor"), 8),
}


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  """The same 3 steps (same init, same batches) on each mesh: {mesh name: (train rows, final state)}."""
  out = {}
  for name, (shape, axes, n) in MESHES.items():
    workdir = str(tmp_path_factory.mktemp("mesh"))
    cfg = make_cfg(steps=3, mesh_shape=shape, mesh_axes=axes)
    task = make_task(cfg)
    assert train(cfg, workdir, task, devices=jax.devices()[:n]) == 0
    out[name] = (train_rows(workdir), saved_state(workdir, cfg, task, 3))
  return out


@pytest.mark.parametrize("name", [m for m in MESHES if m != "1 device"])
def test_mesh_changes_no_loss(mesh_runs, name):
  ref_rows, _ = mesh_runs["1 device"]
  rows, _ = mesh_runs[name]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref_rows], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", [m for m in MESHES if m != "1 device"])
def test_mesh_changes_no_parameters(mesh_runs, name):
  chex.assert_trees_all_close(mesh_runs[name][1]["params"], mesh_runs["1 device"][1]["params"], rtol=1e-5, atol=1e-5)


def test_params_are_actually_sharded_on_the_fsdp_tensor_mesh():
  """Guards the mesh tests against a rule table that silently replicates everything."""
  cfg = make_cfg()
  mesh = sharding.make_mesh((4, 2), ("fsdp", "tensor"))
  _, abstract_params = nnx.split(nnx.eval_shape(make_task(cfg).build_model), nnx.Param)
  embed = sharding.state_shardings(abstract_params, mesh)["embed"]["embedding"]
  assert embed.get_value().shard_shape((VOCAB, 64)) == (VOCAB // 2, 64 // 4)


def test_grad_accumulation_equals_one_big_batch(mesh_runs, tmp_path):
  """grad_accum=2 on (4,2) fsdp x tensor against the grad_accum=1 run of the same mesh and batches."""
  workdir = str(tmp_path / "accum2")
  cfg = make_cfg(steps=3, mesh_shape=(4, 2), mesh_axes=("fsdp", "tensor"), grad_accum=2)
  task = make_task(cfg)
  assert train(cfg, workdir, task) == 0
  rows, state = train_rows(workdir), saved_state(workdir, cfg, task, 3)
  ref_rows, ref_state = mesh_runs["(4,2) fsdp x tensor"]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref_rows], rtol=1e-5, err_msg=key)
  chex.assert_trees_all_close(state["params"], ref_state["params"], rtol=1e-5, atol=1e-5)


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  # Checked every 2 steps: the NaN of step 3 is seen at step 4 and must still be reported as step 3.
  cfg = make_cfg(steps=6)
  cfg.checkpoint.every_steps = 2
  cfg.log.every_steps = 100
  task = make_task(cfg, bad_steps=(3,))
  code = train(cfg, workdir, task)
  assert code != 0
  out = capsys.readouterr().out
  assert "step 3" in out and "non-finite" in out
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=100)
  try:
    assert ckpt.steps() == [2]
  finally:
    ckpt.close()


def test_nan_skip_completes_and_the_bad_step_changes_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = make_cfg(steps=4, nan_policy="skip")
  cfg.checkpoint.update(dict(every_steps=1, keep=10))
  task = make_task(cfg, bad_steps=(3,))
  assert train(cfg, workdir, task) == 0
  rows = {r["step"]: r for r in train_rows(workdir)}
  assert rows[3]["loss"] == "nan" and isinstance(rows[4]["loss"], float)
  assert [rows[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
  # Warmup 1 then cosine from 3e-3 to 3e-4 over steps 1..4: the optimizer applied updates at steps 1, 2 and 4,
  # so step 4 used the schedule's value after 2 updates, 3e-4 + 2.7e-3 * (1 + cos(pi / 3)) / 2 = 2.325e-3
  # (after 3, what the step count would give: 9.75e-4).
  np.testing.assert_allclose(rows[4]["learning_rate"], 2.325e-3, rtol=1e-6)
  s2, s3, s4 = (saved_state(workdir, cfg, task, s) for s in (2, 3, 4))
  for a, b in zip(jax.tree.leaves((s2["params"], s2["opt_state"])), jax.tree.leaves((s3["params"], s3["opt_state"]))):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s3["params"]), jax.tree.leaves(s4["params"]))]
  assert any(changed)  # the step after the bad one trains again
  assert int(s4["opt_state"][1][0].count) == 3


def test_workdir_of_another_model_is_refused_but_newer_default_keys_are_not(tmp_path):
  import ml_collections
  from common.config import ConfigError
  from common.train.resume import check_changes
  cfg = ml_collections.ConfigDict(dict(model=dict(d_model=64, moe=dict(num_experts=0)), data=dict(seq_len=32)))
  (tmp_path / "config.json").write_text(json.dumps(dict(model=dict(d_model=64), data=dict(seq_len=32))))
  assert check_changes(str(tmp_path), cfg) == {}  # written before model.moe existed: still the same run
  cfg.model.d_model = 128
  with pytest.raises(ConfigError, match="model.d_model"):
    check_changes(str(tmp_path), cfg)


def test_overflowing_update_stops_before_any_non_finite_checkpoint(tmp_path, capsys):
  """learning_rate 1e39 overflows float32: loss and gradient stay finite, the update does not. The guard
  stops at step 1 and no checkpoint (with NaN/Inf parameters) is saved as 'the last good one'."""
  workdir = str(tmp_path / "run")
  cfg = make_cfg(steps=2, learning_rate=1e39)
  cfg.checkpoint.every_steps = 1
  assert train(cfg, workdir, make_task(cfg)) != 0
  out = capsys.readouterr().out
  assert "non-finite" in out and "step 1" in out
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=100)
  try:
    assert ckpt.steps() == []
  finally:
    ckpt.close()


@pytest.mark.parametrize("schedule,warmup,expected", [
    ("linear", 2, [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]),
    ("linear", 0, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]),
    # cosine after warmup: 0.5 * (1 + cos(pi * t / 8)) at t = step - 2
    ("cosine", 2, [0.0, 0.5] + [0.5 * (1 + np.cos(np.pi * t / 8)) for t in range(9)])])
def test_learning_rate_schedules_by_hand(schedule, warmup, expected):
  cfg = base_config().train
  cfg.update(learning_rate=1.0, warmup_steps=warmup, steps=10, min_learning_rate_ratio=0.0, schedule=schedule)
  np.testing.assert_allclose([float(learning_rate_schedule(cfg)(s)) for s in range(11)], expected, atol=1e-6)


def test_an_unknown_schedule_names_the_key():
  cfg = base_config().train
  cfg.schedule = "step"
  with pytest.raises(ConfigError, match="train.schedule"):
    learning_rate_schedule(cfg)
