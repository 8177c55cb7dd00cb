"""`python -m pit.train` and the Wiki2023 reader: bad input names the key (and the file and line) before the
workdir is touched and exits 2 on one line; a tiny variant trains through its whole schedule and resumes."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from common.config import ConfigError
from common.scaling.runs import read_metrics
from pit import data as pit_data
from pit.train import main as pit_main

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--config.data.old_per_kind=2", "--config.data.train_entities=3", "--config.data.test_entities=2",
        "--config.data.docs_per_entity=1", "--config.data.base_epochs=1.0", "--config.data.doc_epochs=2.0",
        "--config.data.qa_epochs=1.0", "--config.data.vocab_size=300", "--config.model.d_model=32",
        "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.n_kv_heads=1",
        "--config.model.d_ff=64", "--config.train.batch_size=8", "--config.data.seq_len=288"]


def args(tmp_path, config="pit/configs/tiny.py:variant=pit", *extra):
  return [f"--config={config}", f"--workdir={tmp_path / 'run'}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          *TINY, *extra]


def write_jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.mark.parametrize("config, extra, pattern", [
    ("pit/configs/tiny.py:variant=nope", (), "unknown variant 'nope' .*valid: base, open_book, cpt, it"),
    ("pit/configs/tiny.py", ("--config.data.variant=nope",), "data.variant.*valid: base, open_book, cpt"),
    ("pit/configs/tiny.py", ("--config.data.setting=sideways",), "data.setting"),
    ("pit/configs/tiny.py", ("--config.data.doc_epochs=0.0",), "data.doc_epochs"),
    ("pit/configs/tiny.py", ("--config.data.docs_path=/no/such/docs.jsonl", "--config.data.qa_path=/no/qa.jsonl"),
     "data.docs_path.*/no/such/docs.jsonl: no such file"),
    ("pit/configs/tiny.py", ("--config.data.docs_path=/no/such/docs.jsonl",), "data.qa_path"),
])
def test_bad_input_names_the_key_before_the_workdir_is_touched(tmp_path, monkeypatch, config, extra, pattern):
  monkeypatch.chdir(REPO)
  with pytest.raises(ConfigError, match=pattern):
    pit_main(args(tmp_path, config, *extra))
  assert not (tmp_path / "run").exists()


def test_a_malformed_wiki2023_line_is_named_by_file_and_line(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  docs = write_jsonl(tmp_path / "docs.jsonl", ['{"title": "A", "text": "A was born in 1900.", "split": "train"}',
                                               '{"title": "B", "text": "B was born in 1901.", "split": "test"}'])
  qa = write_jsonl(tmp_path / "qa.jsonl", ['{"title": "A", "question": "When?", "answer": "1900"}',
                                           '{"title": "B", "question": "When?" "answer": "1901"}'])
  with pytest.raises(ConfigError, match=f"data.qa_path.*{qa}:2: not a JSON object"):
    pit_main(args(tmp_path, "pit/configs/tiny.py", f"--config.data.docs_path={docs}", f"--config.data.qa_path={qa}"))
  bad_split = write_jsonl(tmp_path / "docs2.jsonl", ['{"title": "A", "text": "x", "split": "dev"}'])
  with pytest.raises(ConfigError, match="docs2.jsonl:1: 'split'"):
    pit_data.read_wiki2023(bad_split, qa)
  assert not (tmp_path / "run").exists()


def test_wiki2023_files_split_documents_and_their_questions_by_title(tmp_path):
  docs = write_jsonl(tmp_path / "docs.jsonl", ['{"title": "A", "text": "A text.", "split": "train"}',
                                               '{"title": "B", "text": "B text.", "split": "test"}'])
  qa = write_jsonl(tmp_path / "qa.jsonl", ['{"title": "B", "question": "Q1?", "answer": "b"}',
                                           '{"title": "A", "question": "Q2?", "answer": "a"}'])
  corpus = pit_data.read_wiki2023(docs, qa)
  assert [d.text for d in corpus.test_docs] == ["B text."] and [q.answer for q in corpus.test_qa] == ["b"]
  assert [d.text for d in corpus.train_docs] == ["A text."] and [q.answer for q in corpus.train_qa] == ["a"]
  assert corpus.old_docs == ()


def test_command_line_exits_2_with_one_line_naming_the_key(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  command = [sys.executable, "-m", "pit.train", *args(tmp_path, "pit/configs/tiny.py", "--config.data.variant=nope")]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert "data.variant" in proc.stderr


def test_a_tiny_variant_trains_its_whole_schedule_and_a_rerun_resumes_without_training(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  assert pit_main(args(tmp_path, "pit/configs/tiny.py:variant=pit_pp")) == 0
  with open(tmp_path / "run" / "config.json") as f:
    cfg = json.load(f)
  metrics = read_metrics(str(tmp_path / "run"))
  steps = cfg["train"]["steps"]
  assert steps > 3  # three phases after the base, each at least a step
  assert any(m["step"] == steps and "eval/loss" in m for m in metrics)
  assert pit_main(args(tmp_path, "pit/configs/tiny.py:variant=pit_pp")) == 0
  assert len(read_metrics(str(tmp_path / "run"))) == len(metrics)
