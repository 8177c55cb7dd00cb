"""A run's workdir through `etils.epath` only (`common.train.workdir`), so that `--workdir=gs://...` works.

End to end, a local run and its resume with `os`/`open` refused for every path under the workdir in the
trainer's modules: all of config.json, metrics.jsonl, TensorBoard, checkpoints and their records go through
epath. An object-store workdir (a gs:// path, served offline by epath's mock backend from a local folder,
which refuses appends as object stores do): metrics.jsonl is written whole at each flush and a resumed run's
file holds each step once; config.json, samples.txt and the resume checks read and write there.
"""
import builtins
import json
import os

import pytest

from common.config import ConfigError, run_main
from common.train import checkpoint, loop, metrics, restore, resume, workdir as workdir_lib
from common.train.__main__ import main

TRAINER_MODULES = (loop, metrics, checkpoint, resume, restore, workdir_lib)


def argv(workdir, cache_dir, steps):
  return ["--config=common/configs/dense_tiny.py", f"--workdir={workdir}", f"--config.train.steps={steps}",
          "--config.train.batch_size=8", "--config.train.warmup_steps=1", "--config.model.d_model=32",
          "--config.model.n_layers=1", "--config.model.d_ff=64", "--config.data.seq_len=32",
          "--config.data.max_train_bytes=20000", "--config.data.max_eval_bytes=4000",
          f"--config.data.cache_dir={cache_dir}", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.async_save=false", "--config.log.every_steps=1", "--config.log.progress=lines",
          "--config.eval.every_steps=2", "--config.eval.batches=1"]


class _Refusing:
  """A module (os, os.path) whose functions fail when given a path under `root`; `allowed` names pass."""

  def __init__(self, module, root, allowed=()):
    self._module, self._root, self._allowed = module, root, allowed

  def __getattr__(self, name):
    value = getattr(self._module, name)
    if name == "path":
      return _Refusing(value, self._root)
    if not callable(value) or name in self._allowed:
      return value

    def guarded(*args, **kwargs):
      for arg in args:
        if isinstance(arg, (str, os.PathLike)) and os.fspath(arg).startswith(self._root):
          raise AssertionError(f"os.{name}({os.fspath(arg)!r}) on a workdir path, not through epath")
      return value(*args, **kwargs)
    return guarded


def _refuse_os_for(root, monkeypatch):
  def refusing_open(file, *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(root):
      raise AssertionError(f"open({os.fspath(file)!r}) on a workdir path, not through epath")
    return builtins.open(file, *args, **kwargs)
  for module in TRAINER_MODULES:
    if hasattr(module, "os"):
      # os.access: the local-only permission check of a new workdir, not I/O.
      monkeypatch.setattr(module, "os", _Refusing(os, root, allowed=("access",)))
    monkeypatch.setattr(module, "open", refusing_open, raising=False)


def test_a_run_and_its_resume_touch_the_workdir_only_through_epath(tmp_path, monkeypatch):
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
  _refuse_os_for(workdir, monkeypatch)
  for steps in (2, 4):  # the second resumes from step 2: config.json, metrics and the checkpoint read back
    with pytest.raises(SystemExit) as e:
      run_main(lambda: main(argv(workdir, cache, steps)))
    assert e.value.code == 0
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2", "4"]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 4
  assert any(p.name.startswith("events.") for p in (tmp_path / "run" / "tensorboard").iterdir())


@pytest.fixture
def object_store(tmp_path, monkeypatch):
  """gs:// paths served by epath's local-file backend from tmp_path/'gs:' (the cwd is tmp_path), with no
  append, as an object store has none. TensorBoard's writer is recorded, not started (it would go to GCS)."""
  from etils import epath
  from etils.epath import gpath

  def no_append(original, path, mode):
    if "a" in mode or "+" in mode:
      raise AssertionError(f"an object store has no mode {mode!r} ({path})")
    return original(path, mode)

  logdirs = []

  class _Events:
    def __init__(self, logdir):
      logdirs.append(logdir)

    def add_event(self, event):
      pass

    def flush(self):
      pass

    def close(self):
      pass

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// goes to TensorFlow's GCS client
  monkeypatch.setattr(metrics, "_event_file_writer", _Events)
  with epath.testing.mock_epath(open=no_append):
    yield logdirs


def test_object_store_metrics_are_whole_files_and_a_resume_keeps_each_step_once(tmp_path, object_store):
  workdir = "gs://bucket/run"
  local = tmp_path / "gs:" / "bucket" / "run" / "metrics.jsonl"
  local.parent.mkdir(parents=True)  # the workdir, as the loop makes it (an object store needs none)
  writer = metrics.MetricsWriter(workdir)
  assert object_store == ["gs://bucket/run/tensorboard"]
  for step in (1, 2):
    writer.write(step, {"loss": 3.0 - step})
  assert not local.exists()  # buffered until the flush the loop makes before each checkpoint save
  writer.flush()
  writer.write(3, {"loss": 0.5})  # logged after the checkpoint of step 2; the run is then killed
  writer.flush()
  assert [json.loads(line)["step"] for line in local.read_text().splitlines()] == [1, 2, 3]

  resumed = metrics.MetricsWriter(workdir, resume_step=2)  # from the checkpoint of step 2
  assert [json.loads(line)["step"] for line in local.read_text().splitlines()] == [1, 2]
  for step in (3, 4):
    resumed.write(step, {"loss": 1.0 / step})
  resumed.close()
  rows = [json.loads(line) for line in local.read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] == pytest.approx(1 / 3)


def test_object_store_config_samples_and_resume_checks(tmp_path, object_store):
  import ml_collections
  workdir = "gs://bucket/run"
  cfg = ml_collections.ConfigDict({"train": {"steps": 4, "learning_rate": 0.1}})
  assert loop.check_workdir(workdir, cfg) == {}
  run_dir = workdir_lib.run_path(workdir)
  assert str(run_dir) == workdir
  run_dir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_atomic(run_dir / "config.json", resume.config_record(workdir, cfg, {}, 0))
  assert resume.read_config(workdir)["train"]["learning_rate"] == 0.1
  assert restore.read_run_config(workdir, "--workdir").train.steps == 4
  changed = ml_collections.ConfigDict({"train": {"steps": 4, "learning_rate": 0.2}})
  with pytest.raises(ConfigError, match="train.learning_rate"):
    loop.check_workdir(workdir, changed)
  progress = metrics.Progress(4, 0, "lines")
  for step in (2, 4):
    loop._log_samples(workdir, step, {"def f(": "x)"}, progress, True)  # pylint: disable=protected-access
  text = (tmp_path / "gs:" / "bucket" / "run" / "samples.txt").read_text()
  assert text.count("=== step 2 ") == text.count("=== step 4 ") == 1 and text.endswith("def f(x)\n")


def test_an_unreachable_object_store_workdir_is_one_line(tmp_path, monkeypatch):
  """No network or no credentials: the client's error as one ConfigError naming --workdir, no traceback."""
  from etils import epath
  from etils.epath import gpath
  import ml_collections

  def unreachable(original, path):
    raise RuntimeError("Could not resolve host: www.googleapis.com\n when reading metadata")

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  with epath.testing.mock_epath(exists=unreachable):
    with pytest.raises(ConfigError, match=r"^--workdir 'gs://bucket/run' cannot be reached \(RuntimeError: Could "
                                          r"not resolve host: www.googleapis.com\)$"):
      loop.check_workdir("gs://bucket/run", ml_collections.ConfigDict({"train": {"steps": 1}}))
  assert os.listdir(tmp_path) == []
