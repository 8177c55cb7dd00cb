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


def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
  cache = tmp_path / "cache"
  single, multi = tmp_path / "single", tmp_path / "multi"

  # One process, two devices (this also builds the data cache the two processes then share).
  log = tmp_path / "single.log"
  _wait_all([_start(_train_args(single, cache), _env(2), log)], [log], RUN_TIMEOUT_S)

  # Two processes, one device each, one coordinator, one shared workdir.
  port = _free_port()
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = []
  try:
    for i in range(2):
      args = _train_args(multi, cache) + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                          f"--process_id={i}"]
      procs.append(_start(args, _env(1), logs[i]))
  finally:
    _wait_all(procs, logs, RUN_TIMEOUT_S)

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

  # The shared workdir holds one config and the final checkpoint, written jointly.
  assert json.loads((multi / "config.json").read_text())["train"]["steps"] == 6
  assert (multi / "checkpoints" / "6").is_dir()
