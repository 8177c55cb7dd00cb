"""`python -m common.train` in-process (`common.train.__main__.main` under `run_main`, as the command runs it).

Reruns on a workdir: every key that changes the training trajectory is compared with DIR/config.json; a
change is one stderr line and exit 2 naming the key, the workdir untouched, unless `--allow_config_change`
names it, and then config.json records which steps ran under which values. Keys of
`common.train.resume.FREE_KEYS` and spellings of the same path resume silently; a checkpoint is read back
after a change of train.grad_clip (the optimizer state keeps its tree). A run killed mid-write resumes: the
torn last line of metrics.jsonl is dropped and TensorBoard shows each step once.

Bad input: one stderr line, exit 2, the workdir untouched.
"""
import json
import os
import shutil
import stat

import pytest

from common.config import run_main
from common.train import loop
from common.train.__main__ import main
from common.train.resume import FREE_KEYS, check_changes, config_changes, config_record, is_free
from tests.file_helpers import snapshot


def argv(workdir, cache_dir, *extra):
  return ["--config=common/configs/dense_tiny.py", f"--workdir={workdir}", "--config.train.steps=2",
          "--config.train.batch_size=8", "--config.train.warmup_steps=1", "--config.model.d_model=32",
          "--config.model.n_layers=1", "--config.model.d_ff=64", "--config.data.seq_len=32",
          "--config.data.max_train_bytes=20000", "--config.data.max_eval_bytes=4000",
          f"--config.data.cache_dir={cache_dir}", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.async_save=false", "--config.log.every_steps=1", "--config.log.progress=lines",
          "--config.eval.every_steps=100", "--config.eval.batches=1", *extra]


def exit_status(args, capsys):
  """(exit status, stdout, stderr lines) of the command line as `python -m common.train` runs it."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    run_main(lambda: main(args))
  out, err = capsys.readouterr()
  return e.value.code, out, err.splitlines()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A run of 2 steps with a checkpoint at step 2: (workdir, cache dir)."""
  cache_dir = str(tmp_path_factory.mktemp("cache"))
  workdir = str(tmp_path_factory.mktemp("run") / "run")
  with pytest.raises(SystemExit) as e:
    run_main(lambda: main(argv(workdir, cache_dir)))
  assert e.value.code == 0
  return workdir, cache_dir


@pytest.fixture
def run_copy(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  return workdir, finished[1]


@pytest.mark.parametrize("override,key", [
    ("--config.train.learning_rate=0.001", "train.learning_rate"),
    ("--config.train.seed=7", "train.seed"),  # would reorder the data mid-epoch
    ("--config.train.batch_size=16", "train.batch_size"),
    ("--config.train.grad_clip=0.5", "train.grad_clip"),
])
def test_a_trajectory_change_is_refused_naming_the_key(run_copy, capsys, override, key):
  workdir, cache_dir = run_copy
  before = snapshot(workdir)
  status, _, err = exit_status([*argv(workdir, cache_dir, "--config.train.steps=4"), override], capsys)
  assert status == 2 and len(err) == 1, err
  assert f"'{key}'" in err[0] and f"--allow_config_change={key}" in err[0]
  assert snapshot(workdir) == before


def test_an_allowed_change_resumes_and_config_json_keeps_the_history(run_copy, capsys):
  workdir, cache_dir = run_copy
  args = argv(workdir, cache_dir, "--config.train.steps=4", "--config.train.grad_clip=0.0",
              "--config.train.learning_rate=0.001", "--allow_config_change=train.grad_clip,train.learning_rate,"
              "train.steps")
  status, out, err = exit_status(args, capsys)
  assert status == 0, err
  assert f"resumed from {os.path.join(workdir, 'checkpoints')}/2 " in out  # clip 1 -> 0 keeps the tree
  with open(os.path.join(workdir, "config.json")) as f:
    record = json.load(f)
  assert record["train"]["grad_clip"] == 0.0 and record["train"]["learning_rate"] == 0.001
  assert record["config_history"] == [{"until_step": 2, "changed": {
      "train.grad_clip": {"before": 1.0, "after": 0.0},
      "train.learning_rate": {"before": 0.003, "after": 0.001},
      "train.steps": {"before": 2, "after": 4}}}]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == [1, 2, 3, 4]


def test_free_keys_and_another_spelling_of_a_path_resume_silently(run_copy, capsys):
  workdir, cache_dir = run_copy
  args = argv(workdir, cache_dir + "/", "--config.log.every_steps=2", "--config.checkpoint.keep=1",
              "--config.eval.batches=2", "--config.log.progress=auto")
  status, out, err = exit_status(args, capsys)
  assert status == 0, err
  with open(os.path.join(workdir, "config.json")) as f:
    assert "config_history" not in json.load(f)


def test_an_unknown_key_to_allow_is_refused(run_copy, capsys):
  workdir, cache_dir = run_copy
  before = snapshot(workdir)
  status, _, err = exit_status([*argv(workdir, cache_dir), "--allow_config_change=train.learning_rat"], capsys)
  assert status == 2 and len(err) == 1 and "train.learning_rat" in err[0]
  assert snapshot(workdir) == before


def test_the_list_of_free_keys():
  """Hand-picked cases: what does not move the trajectory is free, everything else is compared."""
  for key in ("log.every_steps", "log.progress", "eval.every_steps", "checkpoint.keep", "checkpoint.every_steps",
              "mesh.shape", "data.max_eval_bytes"):
    assert is_free(key), key
  for key in ("train.learning_rate", "train.seed", "train.batch_size", "train.grad_clip", "train.steps",
              "data.path", "data.max_train_bytes", "model.dtype", "logs.x", "evaluation"):
    assert not is_free(key), key
  assert "log" in FREE_KEYS
  old = {"data": {"cache_dir": "/tmp/c/", "path": "a//b/*.txt"}, "train": {"seed": 0}, "config_history": []}
  new = {"data": {"cache_dir": "/tmp/c", "path": "a/b/*.txt"}, "train": {"seed": 0, "new_key": 1}}
  assert config_changes(old, new) == {}
  assert config_changes(old, {"data": new["data"]}) == {"train.seed": (0, "<absent>")}


def test_a_longer_run_is_accepted_and_recorded_without_being_allowed(tmp_path):
  import ml_collections
  (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 2, "seed": 0}}))
  cfg = ml_collections.ConfigDict({"train": {"steps": 4, "seed": 0}})
  changes = check_changes(str(tmp_path), cfg)
  assert changes == {"train.steps": (2, 4)}
  record = json.loads(config_record(str(tmp_path), cfg, changes, from_step=2))
  assert record["config_history"] == [{"until_step": 2, "changed": {"train.steps": {"before": 2, "after": 4}}}]


# --- a run killed mid-write ------------------------------------------------------------------------------------


def test_a_torn_metrics_line_is_dropped_and_tensorboard_shows_each_step_once(run_copy, capsys):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  workdir, cache_dir = run_copy
  args = argv(workdir, cache_dir, "--config.train.steps=4", "--allow_config_change=train.steps")
  assert exit_status(args, capsys)[0] == 0
  # As if killed while writing step 5's line, after logging steps 3 and 4 but before checkpoint 4 was saved.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "loss": 1.2')
  status, out, err = exit_status(args, capsys)
  assert status == 0, err
  assert f"resumed from {os.path.join(workdir, 'checkpoints')}/2 " in out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  events = EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  shown = events.Scalars("loss")
  assert [e.step for e in shown] == [1, 2, 3, 4]
  assert [e.value for e in shown] == pytest.approx([r["loss"] for r in rows if "loss" in r], rel=1e-6)


# --- bad input ------------------------------------------------------------------------------------------------


def _refused(args, capsys, *named):
  status, _, err = exit_status(args, capsys)
  assert status == 2 and len(err) == 1, err
  for text in named:
    assert text in err[0], err[0]


@pytest.mark.parametrize("body,named", [
    ("def get_config(:\n  pass\n", "syntax error"),
    ("import no_such_module_for_this_test\n\ndef get_config():\n  return None\n", "no_such_module_for_this_test"),
])
def test_a_config_file_that_does_not_load(tmp_path, capsys, body, named):
  path = tmp_path / "broken.py"
  path.write_text(body)
  workdir = tmp_path / "run"
  _refused([f"--config={path}", f"--workdir={workdir}"], capsys, str(path), named)
  assert not workdir.exists()


def test_a_workdir_that_is_a_file(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.write_text("notes")
  _refused(argv(str(workdir), str(tmp_path / "cache")), capsys, str(workdir), "is a file")  # before any data
  assert workdir.read_text() == "notes"


def test_a_read_only_parent_of_the_workdir(tmp_path, capsys, monkeypatch):
  parent = tmp_path / "read_only"
  parent.mkdir()
  parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
  if os.geteuid() == 0:  # root writes anywhere; answer as the permission bits do for any other user
    monkeypatch.setattr(loop.os, "access", lambda path, mode: not (mode & os.W_OK and
                                                                   not os.stat(path).st_mode & stat.S_IWUSR))
  try:
    _refused(argv(str(parent / "run"), str(tmp_path / "cache")), capsys, str(parent), "not writable")
    assert os.listdir(parent) == []
  finally:
    parent.chmod(stat.S_IRWXU)


def test_a_model_vocabulary_smaller_than_the_data_vocabulary(finished, tmp_path, capsys):
  workdir = tmp_path / "run"
  _refused(argv(str(workdir), finished[1], "--config.model.vocab_size=128"), capsys, "model.vocab_size", "259")
  assert not workdir.exists()


def test_an_empty_data_file(finished, tmp_path, capsys):
  """Refused by common.data where it lists the training files, before it builds (and logs) its cache: the
  error is the only line."""
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  workdir = tmp_path / "run"
  status, _, err = exit_status(argv(str(workdir), str(tmp_path / "cache"), "--config.data.source=files",
                                    f"--config.data.path={empty}"), capsys)
  assert status == 2 and err[-1].startswith("error: config key 'data.path'") and str(empty) in err[-1], err
  assert len(err) == 1 and "no training text" in err[0], err
  assert not workdir.exists()
