"""Bad input to `python -m astro.train` and `python -m astro.search` names the key (and the file and line)
before a workdir is made, and the command exits 2 with one line on stderr."""
import pathlib
import subprocess
import sys

import pytest

from astro import search
from astro.train import main as train_main
from common.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config, extra, pattern", [
    ("astro/configs/tiny.py:stage=nope", (), "unknown stage 'nope' .*valid: base, sft_direct, sft_astro, rl"),
    ("astro/configs/tiny.py", ("--config.stage=nope",), "'stage': unknown stage 'nope'"),
    ("astro/configs/tiny.py:stage=rl", (), "'init_run': stage 'rl' starts from"),
    ("astro/configs/tiny.py:stage=rl", ("--config.init_run=/no/such/run",), "'init_run'.*/no/such/run"),
    ("astro/configs/tiny.py:stage=rl", ("--config.model.init_from=no-such-entry",), "model.init_from"),
    ("astro/configs/tiny.py:stage=sft_astro", ("--config.model.init_from=x",), "data.search_dir"),
    ("astro/configs/tiny.py:stage=rl", ("--config.init_run=x", "--config.data.path=/no/such/math.jsonl"),
     "data.path.*/no/such/math.jsonl"),
    ("astro/configs/tiny.py:stage=base", ("--config.data.path=x.jsonl",), "data.path.*generated problems"),
    ("astro/configs/tiny.py:stage=rl", ("--config.init_run=x", "--config.rl.kl_method=k9"), "rl.kl_method"),
    ("astro/configs/tiny.py", ("--config.data.max_steps=1",), "data.max_steps"),
])
def test_bad_input_names_the_key_before_the_workdir_is_made(tmp_path, monkeypatch, config, extra, pattern):
  monkeypatch.chdir(REPO)
  with pytest.raises(ConfigError, match=pattern):
    train_main([f"--config={config}", f"--workdir={tmp_path / 'run'}", *extra])
  assert not (tmp_path / "run").exists()


def test_a_malformed_problem_line_is_named_by_file_and_line(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  path = tmp_path / "math.jsonl"
  path.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": 4\n')
  with pytest.raises(ConfigError, match=f"data.path.*{path}:2"):
    train_main(["--config=astro/configs/tiny.py:stage=rl", f"--workdir={tmp_path / 'run'}",
                "--config.init_run=x", f"--config.data.path={path}"])


def test_the_search_needs_an_out_folder_and_a_policy(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(ConfigError, match="--out"):
    search.main(["--config=astro/configs/tiny.py:stage=sft_astro"])
  with pytest.raises(ConfigError, match="search.k"):
    search.main(["--config=astro/configs/tiny.py", f"--out={tmp_path}", "--config.search.k=0"])
  with pytest.raises(ConfigError, match="'init_run'.*/no/run"):
    search.main(["--config=astro/configs/tiny.py", f"--out={tmp_path}", "--config.init_run=/no/run"])


def test_the_command_exits_2_with_one_line():
  done = subprocess.run([sys.executable, "-m", "astro.train", "--config=astro/configs/tiny.py:stage=nope",
                         "--workdir=/tmp/never"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert len(done.stderr.strip().splitlines()) == 1 and "unknown stage 'nope'" in done.stderr
