"""`python -m moma.train` as a user runs it (subprocesses on one CPU device): a few steps of MoMa + MoD write
the per-modality losses and routing statistics, a run resumed from an earlier checkpoint ends bit-identical to
the uninterrupted one, and bad config keys or values exit with status 2 and one line naming the key."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 6
SMALL = ("--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.moma.mod_layers=(1,)",
         "--config.model.d_ff=64", f"--config.train.steps={STEPS}", "--config.train.batch_size=4",
         "--config.train.warmup_steps=2",
         "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=5", "--config.checkpoint.async_save=false",
         "--config.eval.every_steps=3", "--config.eval.batches=1", "--config.log.every_steps=1",
         "--config.data.n_train_docs=200", "--config.data.n_eval_docs=40")


def run(workdir, *extra, variant="moma_mod"):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "-m", "moma.train", f"--config=moma/configs/tiny.py:variant={variant}",
         f"--workdir={workdir}", *SMALL, *extra]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta"))
  try:
    step = max(manager.all_steps())
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return step, jax.tree.map(np.asarray, out["state"]["params"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("moma_train") / "run")
  proc = run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_a_few_steps_log_modality_losses_and_routing_statistics(reference):
  rows = metrics(reference)
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  for key in ("nll", "loss_text", "loss_image", "tokens_per_sec", "mfu", "moe/fraction_dropped",
              "moe/max_load_ratio", "moe/load_0", "mod/selected_fraction"):
    assert all(np.isfinite(r[key]) for r in train), key
  # MoD layers let mod_capacity (0.25) of each row's tokens through.
  assert all(r["mod/selected_fraction"] == pytest.approx(0.25, abs=0.01) for r in train)
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(r["eval/loss_text"] > 0 and r["eval/loss_image"] > 0 for r in evals)
  assert train[-1]["loss"] < train[0]["loss"]


def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  for step in ("4", "6"):  # as if the run had been killed after its checkpoint at step 2
    shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  proc = run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from" in proc.stdout and "/2 " in proc.stdout
  step, params = final_params(workdir)
  ref_step, ref_params = final_params(reference)
  assert step == ref_step == STEPS
  chex.assert_trees_all_equal(params, ref_params)
  last = lambda rows: [r for r in rows if r.get("step") == STEPS and "loss" in r][-1]["loss"]
  assert last(metrics(workdir)) == last(metrics(reference))


@pytest.mark.parametrize("flag, key", [
    ("--config.model.moma.mod_layer=1", "model.moma.mod_layer"),
    ("--config.model.moma.mod_capacity=1.5", "model.moma.mod_capacity"),
])
def test_bad_key_or_value_exits_2_with_one_line_naming_it(tmp_path, flag, key):
  workdir = tmp_path / "run"
  proc = run(str(workdir), flag)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and key in lines[0], proc.stderr
  assert not workdir.exists()
