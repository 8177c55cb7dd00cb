"""`python -m slag.train`: bad input names the key (or the file and line) before the workdir is touched and
exits 2 on one line; a tiny base run and a learned optimizer on it train."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from common.config import ConfigError
from common.scaling.runs import read_metrics
from common.train.restore import read_run_config
from slag import train as slag_train

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--config.model.d_model=16", "--config.model.n_layers=1", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.d_ff=32", "--config.learned_opt.cond_dim=8",
        "--config.learned_opt.hidden=8", "--config.train.batch_size=8",
        "--config.train.steps=3", "--config.eval.batches=1", "--config.log.progress=lines",
        "--config.data.num_entities=8"]


def args(workdir, config="slag/configs/tiny.py", *extra):
  return [f"--config={config}", f"--workdir={workdir}", *TINY, *extra]


@pytest.mark.parametrize("config, extra, pattern", [
    ("slag/configs/tiny.py:stage=nope", (), "unknown stage 'nope'"),
    ("slag/configs/tiny.py", ("--config.stage=nope",), "'stage'.*unknown stage 'nope'"),
    ("slag/configs/tiny.py", ("--config.data.format=csv",), "data.format"),
    ("slag/configs/tiny.py", ("--config.data.path=/no/such/fever.jsonl", "--config.data.format=fever"),
     "/no/such/fever.jsonl: no such file"),
    ("slag/configs/tiny.py", ("--config.model.init_from=no-such-entry",), "model.init_from"),
    ("slag/configs/tiny.py:stage=learned_opt", (), "learned_opt.base_workdir"),
    ("slag/configs/tiny.py:stage=learned_opt", ("--config.learned_opt.base_workdir=/no/run",),
     "learned_opt.base_workdir.*config.json"),
])
def test_bad_input_names_the_key_before_the_workdir_is_touched(tmp_path, monkeypatch, config, extra, pattern):
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("META_PAPERS_HUB", str(tmp_path / "hub"))
  with pytest.raises(ConfigError, match=pattern):
    slag_train.main(args(tmp_path / "run", config, *extra))
  assert not (tmp_path / "run").exists()


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  path = tmp_path / "fever.jsonl"
  path.write_text(json.dumps({"input": "a", "output": [{"answer": "SUPPORTS"}]}) + "\n{broken\n")
  with pytest.raises(ConfigError, match=f"{path}:2: not a JSON object"):
    slag_train.main(args(tmp_path / "run", "slag/configs/tiny.py", f"--config.data.path={path}",
                         "--config.data.format=fever"))
  assert not (tmp_path / "run").exists()


def test_command_line_exits_2_with_one_line_naming_the_key(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  command = [sys.executable, "-m", "slag.train", *args(tmp_path / "run", "slag/configs/tiny.py:stage=nope")]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert "unknown stage 'nope'" in proc.stderr


def test_base_then_learned_optimizer_train_on_the_base_run(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  base = tmp_path / "base"
  assert slag_train.main(args(base)) == 0
  learned = tmp_path / "learned"
  extra = [f"--config.learned_opt.base_workdir={base}", "--config.learned_opt.episodes=16",
           "--config.learned_opt.eval_episodes=8", "--config.learned_opt.num_other=2",
           "--config.learned_opt.sequential=1", "--config.train.steps=2"]
  assert slag_train.main(args(learned, "slag/configs/tiny.py:stage=learned_opt", *extra)) == 0
  cfg = read_run_config(str(learned), "run")
  assert cfg.model.d_model == 16 and cfg.data.num_entities == 8  # taken from the base run
  evals = [m for m in read_metrics(str(learned)) if "eval/update_success" in m]
  assert evals and 0 <= evals[-1]["eval/update_success"] <= 1 and 0 <= evals[-1]["eval/retain"] <= 1
