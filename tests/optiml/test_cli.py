"""`python -m optiml.train`, `optiml.evaluate` and `optiml.reproduce` on bad input: one line naming the key, the
file or the flag, exit 2, nothing written; a tiny base trains, an instruction run starts from it, reruns resume."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from common.config import ConfigError
from common.scaling.runs import read_metrics
from optiml import evaluate as optiml_evaluate
from optiml import reproduce as optiml_reproduce
from optiml.train import main as optiml_main

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.d_ff=64", "--config.train.batch_size=8",
        "--config.data.train_examples=24", "--config.data.corpus_bytes=1500", "--config.data.eval_instances=2",
        "--config.checkpoint.every_steps=2", "--config.eval.batches=1"]


def args(tmp_path, *extra, config="optiml/configs/tiny.py", run="run"):
  return [f"--config={config}", f"--workdir={tmp_path / run}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          *TINY, *extra]


@pytest.mark.parametrize("extra, pattern", [
    (("--config.data.heldout_categories=poetry",), "data.heldout_categories.*unknown category 'poetry'"),
    (("--config.data.sampling=random",), "data.sampling.*unknown sampling 'random'"),
    (("--config.data.components=gossip",), "data.components.*unknown component 'gossip'"),
    (("--config.data.jsonl_paths=/no/such/task.jsonl",), "data.jsonl_paths.*/no/such/task.jsonl: no such file"),
    (("--config.data.niv2_dir=/no/such/tasks",), "data.niv2_dir.*/no/such/tasks: no such folder"),
    (("--config.model.init_from=no-such-entry",), "model.init_from"),
    (("--config.init.run=/no/such/run",), "init.run.*no config.json"),
])
def test_bad_input_names_the_key_before_the_workdir_is_touched(tmp_path, monkeypatch, extra, pattern):
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("META_PAPERS_HUB", str(tmp_path / "hub"))
  with pytest.raises(ConfigError, match=pattern):
    optiml_main(args(tmp_path, *extra))
  assert not (tmp_path / "run").exists()


def test_a_malformed_jsonl_task_line_is_named_by_file_and_line(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  bad = tmp_path / "qa.jsonl"
  bad.write_text('{"inputs": "a", "targets": "b"}\n{"inputs": "c", "targets": 3}\n')
  with pytest.raises(ConfigError, match=f"{bad}:2: field 'targets'"):
    optiml_main(args(tmp_path, f"--config.data.jsonl_paths={bad}"))
  assert not (tmp_path / "run").exists()


def test_unknown_stage_and_arm_are_refused():
  with pytest.raises(ConfigError, match="unknown stage 'sft'"):
    optiml_main(["--config=optiml/configs/tiny.py:stage=sft", "--workdir=/tmp/unused"])
  with pytest.raises(SystemExit) as exit_info:
    optiml_reproduce.main(["--arms=it,nope", "--out=/tmp/unused_optiml"])
  assert exit_info.value.code == 2


def test_command_line_exits_2_with_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  command = [sys.executable, "-m", "optiml.train", *args(tmp_path, "--config.data.heldout_categories=poetry")]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "poetry" in proc.stderr
  assert not (tmp_path / "run").exists()


def test_a_base_pretrains_an_instruction_run_starts_from_it_and_reruns_resume(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  assert optiml_main(args(tmp_path, "--config.data.epochs=0.1", config="optiml/configs/tiny.py:stage=pretrain",
                          run="base")) == 0
  base = str(tmp_path / "base")
  assert optiml_main(args(tmp_path, f"--config.init.run={base}")) == 0
  with open(tmp_path / "run" / "config.json") as f:
    cfg = json.load(f)
  assert cfg["model"]["d_model"] == 32 and cfg["init"]["run"] == base
  metrics = read_metrics(str(tmp_path / "run"))
  assert any(m["step"] == cfg["train"]["steps"] and "eval/loss" in m for m in metrics)
  assert optiml_main(args(tmp_path, f"--config.init.run={base}")) == 0
  assert len(read_metrics(str(tmp_path / "run"))) == len(metrics)
  capsys.readouterr()
  assert optiml_evaluate.main([f"--workdir={tmp_path / 'run'}", "--shots=0", "--max_per_task=1"]) == 0
  result = json.loads(capsys.readouterr().out)
  for level in ("heldout_category", "heldout_task", "heldout_instance"):
    assert 0 <= result[f"{level}/0shot"] <= 100
  with pytest.raises(ConfigError, match="--shots"):
    optiml_evaluate.main([f"--workdir={tmp_path / 'run'}", "--shots=two"])
