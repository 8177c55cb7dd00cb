"""The commands: bad input (unknown selection / perturbation / family, a malformed or missing jsonl file, an
unknown hub entry) is one line naming it and exit 2; a tiny meta-training run is evaluated end to end."""
import json
import pathlib

import pytest

from common.config import ConfigError, run_main
from icl_explanations import evaluate, reproduce
from icl_explanations.train import main as train_main

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.d_ff=64", "--config.train.batch_size=8",
        "--config.train.steps=2", "--config.data.train_examples=16", "--config.data.eval_examples=8",
        "--config.eval.every_steps=2", "--config.eval.batches=1", "--config.checkpoint.every_steps=2",
        "--config.log.progress=lines"]


@pytest.mark.parametrize("flags, pattern", [
    (["--selection=best"], "--selection: unknown selection 'best'"),
    (["--perturbation=shuffle"], "--perturbation: unknown perturbation 'shuffle'"),
    (["--similarity=jaccard"], "--similarity: unknown similarity 'jaccard'"),
    (["--family=chess"], "--family: unknown family 'chess'"),
    (["--data=/no/such/file.jsonl", "--reader=plain"], "/no/such/file.jsonl: no such file"),
    (["--model=no-such-model"], "hub checkpoint 'no-such-model': not found"),
    ([], "exactly one of --workdir"),
])
def test_evaluate_bad_input_names_it(flags, pattern, tmp_path, monkeypatch):
  monkeypatch.setenv("META_PAPERS_HUB", str(tmp_path / "hub"))
  with pytest.raises(ConfigError, match=pattern):
    evaluate.main(["--episodes=1", "--queries=1", "--pool_size=4", *flags])


def test_a_malformed_jsonl_line_is_one_line_naming_file_and_line_with_exit_2(tmp_path, capsys):
  path = tmp_path / "gsm8k.jsonl"
  path.write_text('{"question": "q", "answer": "a\\n#### 1"}\n{"question": \n')
  with pytest.raises(SystemExit) as exit_info:  # what `python -m icl_explanations.evaluate` runs
    run_main(lambda: evaluate.main(["--model=x", f"--data={path}"]))
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and err.splitlines() == [err] and f"{path}:2: not a JSON object" in err


def test_train_refuses_an_unknown_family_before_the_workdir_is_touched(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(ConfigError, match="data.families.*unknown family 'chess'"):
    train_main(["--config=icl_explanations/configs/tiny.py", f"--workdir={tmp_path / 'run'}",
                "--config.data.families=arith,chess"])
  assert not (tmp_path / "run").exists()


def test_reproduce_refuses_an_unknown_family(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    reproduce.main([f"--out={tmp_path}", "--families=chess"])
  assert exit_info.value.code == 2 and "--families: unknown family 'chess'" in capsys.readouterr().err


def test_a_tiny_meta_trained_run_is_evaluated_end_to_end(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  workdir = tmp_path / "run"
  assert train_main(["--config=icl_explanations/configs/tiny.py:families=arith", f"--workdir={workdir}", *TINY]) == 0
  capsys.readouterr()
  assert evaluate.main([f"--workdir={workdir}", "--episodes=2", "--queries=2", "--pool_size=4", "--shots=2",
                        "--query_form=mixed", "--selection=mmr", "--perturbation=mask_ops"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["n"] == 4 and 0 <= result["accuracy"] <= 100 and "rule_accuracy" in result
  prompt = result["examples"][0]["prompt"]
  answers = [line for line in prompt.splitlines() if line.startswith("A: ")]
  assert prompt.count("Q: ") == 3 and prompt.endswith("A:") and len(answers) == 2
  assert all("_" in line and not any(s in line.split(". ", 1)[1] for s in "+-x") for line in answers)
