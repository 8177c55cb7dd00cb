"""Multi-process start-up (common.distributed) and the multi-process contract of `python -m common.train`:
two processes with one CPU device each train exactly like one process with two devices."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from common import distributed
from common.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]
ENV_KEYS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_DISTRIBUTED_AUTO")
RUN_TIMEOUT_S = 300  # one tiny run takes well under a minute on a loaded 2-core machine


# ------------------------------------------------------------------------------------ flag handling

@pytest.fixture
def fake_initialize(monkeypatch):
  """Records jax.distributed.initialize calls (and the CPU collectives option at call time)."""
  for key in ENV_KEYS:
    monkeypatch.delenv(key, raising=False)
  calls = []

  def fake(**kwargs):
    calls.append((kwargs, jax.config.jax_cpu_collectives_implementation))

  monkeypatch.setattr(jax.distributed, "initialize", fake)
  return calls


def test_initialize_without_flags_does_nothing(fake_initialize):
  assert distributed.initialize({}) is False
  assert fake_initialize == []


def test_initialize_from_flags_uses_gloo_on_cpu(fake_initialize):
  flags = {"coordinator_address": "127.0.0.1:1234", "num_processes": "2", "process_id": "1"}
  assert distributed.initialize(flags) is True
  assert fake_initialize == [(dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1), "gloo")]


def test_initialize_from_environment(fake_initialize, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:99")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  assert distributed.initialize({}) is True
  assert fake_initialize[0][0] == dict(coordinator_address="10.0.0.1:99", num_processes=4, process_id=0)


def test_initialize_turns_on_the_preemption_service(fake_initialize, monkeypatch):
  """The trainer's SIGTERM handling in a multi-process run needs JAX's preemption sync manager, which
  jax.distributed.initialize starts only with this option on."""
  was = jax.config.jax_enable_preemption_service
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: fake_initialize.append(
      jax.config.jax_enable_preemption_service))
  jax.config.update("jax_enable_preemption_service", False)
  try:
    assert distributed.initialize({"coordinator_address": "h:1", "num_processes": "2", "process_id": "0"})
  finally:
    jax.config.update("jax_enable_preemption_service", was)
  assert fake_initialize == [True]


def test_a_multi_process_run_stops_at_the_step_jax_syncs_on_without_a_collective(monkeypatch):
  """With jax.distributed initialised, SIGTERM is JAX's (no Python handler replaces its notifier), the stop
  step is the preemption sync point, and no step gathers anything from the other processes."""
  from jax.experimental import multihost_utils
  from common.train import loop
  asked = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: asked.append(step) or step == 3)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda *a, **k: pytest.fail("a per-step all-gather"))
  before = signal.getsignal(signal.SIGTERM)
  preemption = loop._Preemption()  # pylint: disable=protected-access
  assert signal.getsignal(signal.SIGTERM) is before
  assert [preemption.reached(step) for step in (1, 2, 3)] == [False, False, True] and asked == [1, 2, 3]
  preemption.restore()
  assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("flags,needle", [
    ({"coordinator_address": "127.0.0.1:1234"}, "together"),
    ({"coordinator_address": "h:1", "num_processes": "2", "process_id": "2"}, "outside"),
    ({"coordinator_address": "h:1", "num_processes": "two", "process_id": "0"}, "integers"),
])
def test_initialize_rejects_bad_flags(fake_initialize, flags, needle):
  with pytest.raises(ConfigError, match=needle):
    distributed.initialize(flags)
  assert fake_initialize == []


# ------------------------------------------------------------------------ two processes vs one process

def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(n_devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"  # replaces the tests' 8
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


def _train_args(workdir, cache_dir) -> list[str]:
  return [sys.executable, "-m", "common.train", "--config=common/configs/dense_tiny.py", f"--workdir={workdir}",
          "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.d_ff=192",
          "--config.data.seq_len=64", "--config.train.batch_size=8", "--config.train.steps=6",
          "--config.data.max_train_bytes=200000", "--config.data.max_eval_bytes=20000",
          f"--config.data.cache_dir={cache_dir}", "--config.log.every_steps=1", "--config.log.progress=lines",
          "--config.eval.batches=2"]


def _start(args, env, log_path):
  log = open(log_path, "w")
  # A session of its own, so that a hung run (and anything it started) can be killed as a group.
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  log.close()
  return proc


def _kill(proc):
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait()


def _wait_all(procs, logs, timeout):
  """Waits for every process; on a failure or the deadline, kills them all and fails with their logs."""
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      _kill(p)
  codes = [p.returncode for p in procs]
  if codes != [0] * len(procs):
    tails = "\n".join(f"--- {path} (exit {c})\n" + pathlib.Path(path).read_text()[-3000:]
                      for path, c in zip(logs, codes))
    pytest.fail(f"training processes exited {codes} (timeout {timeout}s)\n{tails}")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
  """One data cache for this module's runs (the first run builds it)."""
  return tmp_path_factory.mktemp("cache")


def test_two_processes_train_like_one_process_with_two_devices(tmp_path, shared_cache):
  """Per-host input: each process reads and packs only its half of the training files (data.shards defaults
  to one shard per process) and builds only its rows of each batch; one process with two devices and
  data.shards=2 sees the same global batches, so the losses agree."""
  cache = shared_cache
  single, multi = tmp_path / "single", tmp_path / "multi"

  # One process, two devices, the same two data shards.
  log = tmp_path / "single.log"
  _wait_all([_start(_train_args(single, cache) + ["--config.data.shards=2"], _env(2), log)], [log], RUN_TIMEOUT_S)
  assert "shard 0 of 2" in log.read_text() and "shard 1 of 2" in log.read_text()

  # Two processes, one device each, one coordinator, one shared workdir, a cache of their own.
  port = _free_port()
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = []
  try:
    for i in range(2):
      args = _train_args(multi, tmp_path / "cache2") + [f"--coordinator_address=127.0.0.1:{port}",
                                                        "--num_processes=2", f"--process_id={i}"]
      procs.append(_start(args, _env(1), logs[i]))
  finally:
    _wait_all(procs, logs, RUN_TIMEOUT_S)
  for i in range(2):  # each packed its own shard and never the other's
    text = logs[i].read_text()
    assert f"shard {i} of 2" in text and f"shard {1 - i} of 2" not in text, text[-2000:]

  # They formed one mesh of 2 devices (not two independent 1-device runs, which would also match).
  lead_log = logs[0].read_text()
  assert "on 2 cpu device(s)" in lead_log and "'data': 2" in lead_log, lead_log[-2000:]

  want, got = _metrics(single), _metrics(multi)
  want_loss = {r["step"]: r["loss"] for r in want if "loss" in r}
  got_loss = {r["step"]: r["loss"] for r in got if "loss" in r}
  assert sorted(want_loss) == list(range(1, 7))
  assert sorted(got_loss) == sorted(want_loss)  # one line per step: only process 0 writes metrics
  for step, loss in want_loss.items():
    assert got_loss[step] == pytest.approx(loss, rel=1e-5), step
  want_eval = [r["eval/loss"] for r in want if "eval/loss" in r]
  got_eval = [r["eval/loss"] for r in got if "eval/loss" in r]
  assert len(got_eval) == len(want_eval) == 1
  assert got_eval[0] == pytest.approx(want_eval[0], rel=1e-5)

  # The shared workdir holds one config (the shard count it ran with) and the final checkpoint, written jointly.
  record = json.loads((multi / "config.json").read_text())
  assert record["train"]["steps"] == 6 and record["data"]["shards"] == 2
  assert (multi / "checkpoints" / "6").is_dir()


def _train_lines(workdir):
  return [r for r in _metrics(workdir) if "loss" in r] if (pathlib.Path(workdir) / "metrics.jsonl").exists() else []


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_exits_143(tmp_path, shared_cache):
  """SIGTERM reaches process 1 only; JAX's preemption sync tells both the same step, where they save the
  checkpoint together (the lead's last metrics line is that step) and exit 143."""
  cache, workdir = shared_cache, tmp_path / "run"
  port = _free_port()
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  args = [_train_args(workdir, cache) + ["--config.train.steps=400", f"--coordinator_address=127.0.0.1:{port}",
                                         "--num_processes=2", f"--process_id={i}"] for i in range(2)]
  procs = [_start(a, _env(1), log) for a, log in zip(args, logs)]
  try:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not _train_lines(workdir) or _train_lines(workdir)[-1]["step"] < 2:
      assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs[0].read_text()[-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      _kill(p)
  assert codes == [143, 143], [log.read_text()[-2000:] for log in logs]
  last = _train_lines(workdir)[-1]["step"]
  assert 2 <= last < 400
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == last
  assert f"saved a checkpoint at step {last}" in logs[0].read_text()
