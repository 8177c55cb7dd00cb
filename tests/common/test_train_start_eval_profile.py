"""Starting, evaluating and watching a run (issue 14's scale features), through `python -m common.train`:
`train.init_from` (a run folder or a hub entry) gives a new run those parameters and a fresh optimizer;
`--eval_only` evaluates without training or touching the run; `log.profile_steps` writes a profiler trace;
every metrics row has goodput and HFU (= MFU x the remat recompute factor)."""
import json
import os
import pathlib

import pytest

from common.models import checkpoint_library
from common.train.restore import load_run_model, read_run_config
from common.models import build_model
from tests.common.test_train_inprocess import argv, exit_status
from tests.file_helpers import snapshot


SOURCE = ("--config.train.learning_rate=0.03", "--config.train.steps=6")


def _run(tmp_path_factory, name, *extra):
  cache_dir = str(tmp_path_factory.mktemp("cache"))
  workdir = str(tmp_path_factory.mktemp(name) / name)
  return workdir, cache_dir, argv(workdir, cache_dir, *extra)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A finished run of 6 steps (LR high enough that its parameters differ clearly from a fresh init)."""
  workdir, cache_dir, args = _run(tmp_path_factory, "source", *SOURCE)
  from common.config import run_main
  from common.train.__main__ import main
  with pytest.raises(SystemExit) as e:
    run_main(lambda: main(args))
  assert e.value.code == 0
  return workdir, cache_dir


def _eval_record(workdir, step):
  return json.loads((pathlib.Path(workdir) / "eval" / f"step_{step}.json").read_text())


def test_eval_only_evaluates_the_newest_checkpoint_and_changes_nothing_else(source, capsys):
  workdir, cache_dir = source
  before = snapshot(workdir)
  code, out, _ = exit_status(argv(workdir, cache_dir, *SOURCE, "--eval_only", "--config.eval.batches=2"), capsys)
  assert code == 0 and "eval only" in out
  record = _eval_record(workdir, 6)
  assert record["step"] == 6 and record["batches"] == 2 and record["eval/loss"] > 0
  after = snapshot(workdir)
  assert {k: v for k, v in after.items() if k != "eval" and not k.startswith("eval/")} == before


def test_eval_only_without_anything_to_evaluate_is_refused_untouched(tmp_path, capsys):
  workdir = tmp_path / "empty"
  code, _, err = exit_status(argv(str(workdir), str(tmp_path / "cache"), "--eval_only"), capsys)
  assert code == 2 and len(err) == 1 and "--eval_only" in err[0]
  assert not workdir.exists()


def test_init_from_a_run_gives_its_parameters_and_a_fresh_optimizer(source, tmp_path, capsys):
  src, cache_dir = source
  new = str(tmp_path / "new")
  # Evaluated before training, the new run's parameters are the source's: the same loss on the same batches.
  code, out, _ = exit_status(argv(src, cache_dir, *SOURCE, "--eval_only"), capsys)
  assert code == 0
  code, out, _ = exit_status(argv(new, cache_dir, f"--config.train.init_from={src}", "--eval_only"), capsys)
  assert code == 0 and f"run '{src}' step 6" in out
  assert _eval_record(new, 0)["eval/loss"] == pytest.approx(_eval_record(src, 6)["eval/loss"], rel=1e-6)
  assert not (pathlib.Path(new) / "checkpoints").exists() or not os.listdir(pathlib.Path(new) / "checkpoints")
  # Trained: it counts its own steps from 0 (a fresh optimizer and step), starting at the source's loss level.
  code, out, _ = exit_status(argv(new, cache_dir, f"--config.train.init_from={src}"), capsys)
  assert code == 0 and "a fresh optimizer" in out
  rows = [json.loads(line) for line in open(os.path.join(new, "metrics.jsonl")) if '"loss"' in line]
  assert [r["step"] for r in rows] == [1, 2]
  fresh = [json.loads(line) for line in open(os.path.join(src, "metrics.jsonl")) if '"loss"' in line]
  assert rows[0]["loss"] < fresh[0]["loss"]  # the source started from random parameters; the new run did not
  # Rerun: it resumes from its own checkpoint; init_from is no longer read (free to change or drop).
  code, out, _ = exit_status(argv(new, cache_dir, "--config.train.steps=3", "--config.train.init_from="), capsys)
  assert code == 0 and "resumed from" in out


def test_init_from_a_hub_entry(source, tmp_path, capsys, monkeypatch):
  src, cache_dir = source
  monkeypatch.setenv(checkpoint_library.ENV_ROOT, str(tmp_path / "hub"))
  cfg = read_run_config(src, "test")
  model, _ = load_run_model(src, cfg, lambda: build_model(cfg.model, seed=0), key="test")
  checkpoint_library.save("from-source", cfg.model, model)
  new = str(tmp_path / "new")
  code, out, _ = exit_status(argv(new, cache_dir, "--config.train.init_from=from-source", "--eval_only"), capsys)
  assert code == 0 and "hub entry 'from-source'" in out
  code, _, _ = exit_status(argv(src, cache_dir, *SOURCE, "--eval_only"), capsys)
  assert _eval_record(new, 0)["eval/loss"] == pytest.approx(_eval_record(src, 6)["eval/loss"], rel=1e-6)


@pytest.mark.parametrize("value, needle", [("nowhere-entry", "neither a run folder"),
                                           ("RUN", "holds other parameters")])
def test_init_from_bad_sources_are_refused_naming_the_key(source, tmp_path, capsys, value, needle, monkeypatch):
  src, cache_dir = source
  monkeypatch.setenv(checkpoint_library.ENV_ROOT, str(tmp_path / "hub"))
  value = src if value == "RUN" else value
  new = tmp_path / "new"
  code, _, err = exit_status(argv(str(new), cache_dir, f"--config.train.init_from={value}",
                                  "--config.model.d_model=48"), capsys)
  assert code == 2 and len(err) == 1 and "train.init_from" in err[0] and needle in err[0], err


def test_profile_window_goodput_and_hfu(tmp_path_factory, capsys):
  workdir, cache_dir, args = _run(tmp_path_factory, "profiled", "--config.log.profile_steps=2:2",
                                  "--config.model.remat=full")
  code, out, _ = exit_status(args, capsys)
  assert code == 0 and "profile of steps 2..2" in out
  traces = list(pathlib.Path(workdir, "profile").rglob("*.xplane.pb"))
  assert traces, list(pathlib.Path(workdir).rglob("*"))
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in line]
  for r in rows:
    assert 0.0 < r["goodput"] <= 1.0
    assert r["hfu"] == pytest.approx(r["mfu"] * 4 / 3)


@pytest.mark.parametrize("window", ["3:2", "0:1", "two"])
def test_bad_profile_window_is_refused(tmp_path, capsys, window):
  code, _, err = exit_status(argv(str(tmp_path / "w"), str(tmp_path / "c"), f"--config.log.profile_steps={window}"),
                             capsys)
  assert code == 2 and len(err) == 1 and "log.profile_steps" in err[0]
  assert not (tmp_path / "w").exists()
