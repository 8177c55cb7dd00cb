"""`python -m common.train` as a user runs it (real subprocesses), against the command-line contract of
ARCHITECTURE.md: resume after SIGKILL ends exactly where an uninterrupted run ends, SIGTERM saves and exits
143, a corrupt checkpoint is set aside, bad input is one line on stderr with exit status 2.

Subprocesses run on ONE CPU device (XLA_FLAGS sets the device count to 1; they do not get the 8 simulated
devices of the test process). TF_CPP_MIN_LOG_LEVEL is removed from their environment so that the entry point's
own logging set-up is what is tested. One uninterrupted reference run is shared by the module.
"""
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tests.file_helpers import snapshot

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS, EVERY = 30, 5


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  return env


def command(workdir, cache_dir, *extra):
  return [sys.executable, "-m", "common.train", "--config=common/configs/dense_tiny.py", f"--workdir={workdir}",
          f"--config.train.steps={STEPS}", "--config.train.batch_size=8", "--config.train.warmup_steps=5",
          "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.d_ff=128",
          "--config.data.seq_len=64", "--config.data.max_train_bytes=200000",
          "--config.data.max_eval_bytes=20000", f"--config.data.cache_dir={cache_dir}",
          f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.keep=3",
          "--config.checkpoint.async_save=true", "--config.log.every_steps=1", "--config.eval.every_steps=10",
          "--config.eval.batches=2", *extra]


def run(cmd, timeout=300):
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def start(cmd):
  return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_lines(workdir):
  return [r for r in metrics(workdir) if "loss" in r]


def wait_for_step(proc, workdir, step, checkpoint=None, timeout=240):
  """Blocks until metrics.jsonl holds a train line at `step` or later and, if given, the `checkpoint` step
  folder is complete (async saves are renamed from '<step>.orbax-checkpoint-tmp' when committed); the
  process must still be running."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, f"the run ended (status {proc.returncode}) before step {step}"
    if checkpoint is not None and not os.path.isdir(os.path.join(workdir, "checkpoints", str(checkpoint))):
      time.sleep(0.005)
      continue
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(l)["step"] for l in f if l.endswith("\n") and '"loss"' in l]
      if steps and max(steps) >= step:
        return max(steps)
    time.sleep(0.005)
  raise TimeoutError(f"no step {step} within {timeout}s")


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def final_params(workdir):
  """Parameters of the newest checkpoint, restored here as saved (one device)."""
  step = checkpoint_steps(workdir)[-1]
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta"))
  try:
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return step, jax.tree.map(np.asarray, out["state"]["params"])


def assert_same_run(workdir, ref_workdir):
  """Same train/eval numbers at every step and bit-identical final parameters."""
  keys = ("loss", "grad_norm", "learning_rate", "eval/loss")
  strip = lambda rows: [{k: r[k] for k in ("step", *keys) if k in r} for r in rows]
  assert strip(metrics(workdir)) == strip(metrics(ref_workdir))
  step, params = final_params(workdir)
  ref_step, ref_params = final_params(ref_workdir)
  assert step == ref_step == STEPS
  chex.assert_trees_all_equal(params, ref_params)


def corrupt(step_dir):
  """Overwrites every file of a checkpoint's state with garbage of the same size."""
  files = [p for p in pathlib.Path(step_dir, "state").rglob("*") if p.is_file()]
  assert files
  for p in files:
    p.write_bytes(b"\xde\xad" * (p.stat().st_size // 2 + 1))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """One uninterrupted run: (workdir, completed process)."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  proc = run(command(workdir, cache_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


# --- outputs -------------------------------------------------------------------------------------------------


def test_train_lines_carry_loss_learning_rate_throughput_and_mfu(reference):
  lines = train_lines(reference[0])
  assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
  for r in lines:
    for key in ("loss", "learning_rate", "tokens_per_sec", "mfu"):
      assert isinstance(r[key], float) and np.isfinite(r[key]), (r["step"], key)
    assert r["tokens_per_sec"] > 0 and r["mfu"] > 0


def test_eval_lines_carry_eval_loss_at_eval_steps(reference):
  evals = [r for r in metrics(reference[0]) if "eval/loss" in r]
  assert [r["step"] for r in evals] == [10, 20, 30]
  assert all(k.startswith("eval/") for r in evals for k in r if k != "step")


def test_config_json_is_the_resolved_config(reference):
  with open(os.path.join(reference[0], "config.json")) as f:
    cfg = json.load(f)
  assert cfg["train"]["steps"] == STEPS and cfg["model"]["d_model"] == 64
  assert cfg["model"]["vocab_size"] > 0  # 0 in the file means 'from the data': resolved before writing


def test_tensorboard_holds_the_same_losses(reference):
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  files = glob.glob(os.path.join(reference[0], "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1
  losses = {}
  for event in EventFileLoader(files[0]).Load():
    for v in event.summary.value:
      if v.tag == "loss":
        losses[event.step] = v.tensor.float_val[0]
  expected = {r["step"]: r["loss"] for r in train_lines(reference[0])}
  assert losses.keys() == expected.keys()
  np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=1e-6)


def test_checkpoints_are_the_last_keep_multiples_of_every_steps(reference):
  assert checkpoint_steps(reference[0]) == [20, 25, 30]


# --- interruptions --------------------------------------------------------------------------------------------


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_ends(reference, cache_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cmd = command(workdir, cache_dir)
  proc = start(cmd)
  try:
    wait_for_step(proc, workdir, EVERY + 2, checkpoint=EVERY)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL
  killed_after = train_lines(workdir)[-1]["step"]
  assert killed_after < STEPS
  resumed = run(cmd)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  resumed_from = [l for l in resumed.stdout.splitlines() if l.startswith("resumed from ")]
  assert len(resumed_from) == 1, resumed.stdout
  step0 = int(resumed_from[0].split()[2].rsplit("/", 1)[1])
  assert step0 % EVERY == 0 and EVERY <= step0 <= killed_after  # the newest complete checkpoint
  steps = [r["step"] for r in train_lines(workdir)]
  assert steps == sorted(set(steps))  # strictly increasing, no duplicates
  assert train_lines(workdir)[-1]["loss"] == train_lines(reference[0])[-1]["loss"]
  assert_same_run(workdir, reference[0])


def test_sigterm_saves_at_the_current_step_and_exits_143(reference, cache_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cmd = command(workdir, cache_dir)
  proc = start(cmd)
  try:
    wait_for_step(proc, workdir, EVERY + 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 143
  last = train_lines(workdir)[-1]["step"]
  assert last < STEPS
  assert checkpoint_steps(workdir)[-1] == last  # saved at the step it stopped at
  assert f"saved a checkpoint at step {last}" in out
  rerun = run(cmd)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from {os.path.join(workdir, 'checkpoints')}/{last} " in rerun.stdout
  assert_same_run(workdir, reference[0])


# --- corrupt checkpoints -------------------------------------------------------------------------------------


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  corrupt(os.path.join(ckpt_dir, "30"))
  garbage = sorted(str(p.relative_to(ckpt_dir, "30")) for p in pathlib.Path(ckpt_dir, "30").rglob("*"))
  cmd = command(workdir, json.load(open(os.path.join(workdir, "config.json")))["data"]["cache_dir"])
  proc = run(cmd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint step 30" in proc.stdout and "corrupt" in proc.stdout
  assert f"resumed from {ckpt_dir}/25 " in proc.stdout
  aside = glob.glob(os.path.join(ckpt_dir, "30.corrupt-*"))
  assert len(aside) == 1  # renamed, not deleted
  assert sorted(str(p.relative_to(aside[0])) for p in pathlib.Path(aside[0]).rglob("*")) == garbage
  assert_same_run(workdir, reference[0])


def test_every_checkpoint_corrupt_is_exit_2_and_changes_nothing(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  for step in checkpoint_steps(workdir):
    corrupt(os.path.join(workdir, "checkpoints", str(step)))
  before = snapshot(workdir)
  cache = json.load(open(os.path.join(workdir, "config.json")))["data"]["cache_dir"]
  proc = run(command(workdir, cache))
  assert proc.returncode == 2
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, proc.stderr
  assert "checkpoint" in lines[0] and os.path.join(workdir, "checkpoints") in lines[0]
  assert snapshot(workdir) == before


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,named", [
    (["--config.train.stepz=3"], "train.stepz"),
    (["--config.model.n_heads=3"], "model.d_model"),  # 64 is not divisible by 3 heads
    (["--config.mesh.shape=(3,)"], "mesh.shape"),  # this run has 1 device
    (["--config.data.source=files", "--config.data.path=/nonexistent/*.txt"], "/nonexistent/*.txt"),
    (["--config=common/configs/no_such_config.py"], "no_such_config.py"),
    (["--config.data.source=tfds", "--config.data.tfds_name=no_such_dataset",
      "--config.data.tfds_data_dir=/nonexistent_tfds"], "/nonexistent_tfds"),  # imports TensorFlow first
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path, extra, named):
  workdir = tmp_path / "run"
  # A fresh, empty data cache: a check that came only after the data is built would show its log lines.
  proc = run(command(str(workdir), str(tmp_path / "cache"), *extra))
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, proc.stderr
  assert named in lines[0]
  assert not workdir.exists()


def test_jax_distributed_auto_off_a_cluster_is_one_line_and_exit_2(tmp_path):
  workdir = tmp_path / "run"
  env = dict(_env(), JAX_DISTRIBUTED_AUTO="1")
  for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
    env.pop(var, None)
  proc = subprocess.run(command(str(workdir), str(tmp_path / "cache")), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and "JAX_DISTRIBUTED_AUTO=1" in lines[0], proc.stderr
  assert not workdir.exists()
