"""`python -m ease.reproduce`: the main study as it was, and `--study=levels` (sentence vs token level on the
cnndm and xsum styles) in its own files."""
import json
import os

import pytest

from common import reproduce as harness
from ease import reproduce


def _study(*argv):
  args = harness.parser(reproduce.Study, reproduce.__doc__).parse_args(["--out=OUT", *argv])
  args.seeds = args.seeds or 3
  return reproduce.Study(args)


def test_main_study_keeps_its_arms_budgets_and_files():
  study = _study()
  assert [a.name for a in study.arms()] == ["abstractive", "lead", "ease_sent_pi0.3_b0.1", "ease_sent_pi0.5_b0.1",
                                            "ease_sent_pi0.3_b1", "ease_tok_pi0.3_b0.1"]
  assert study.arms()[5].config.endswith("tiny.py:variant=ease,level=token,pi=0.3,beta=0.1")
  # The scoring a finished run's record is read back with (not rescored), and the study's scale.
  assert study.scoring() == dict(budgets=[0.2, 0.4, 0.6, 1.0], docs=128)
  a = study.args
  assert (a.out, a.steps, a.train_docs, a.budgets, study.plot_name) == ("OUT", 300, 20000, "0.2,0.4,0.6,1.0",
                                                                         "rouge_vs_evidence.png")
  cfg = study.config(study.arms()[2], seed=1)
  assert cfg.data.style == "cnndm" and cfg.model.d_model == 128 and cfg.train.steps == 300


def test_levels_study_arms_and_estimate(capsys):
  study = _study("--study=levels")
  assert study.args.out == os.path.join("OUT", "levels") and study.budgets == [0.2, 0.4]
  arms = study.arms()
  assert [(a.extra["style"], a.extra["level"]) for a in arms] == [("cnndm", "sentence"), ("cnndm", "token"),
                                                                  ("xsum", "sentence"), ("xsum", "token")]
  configs = [study.config(a, seed=0) for a in arms]
  assert [(c.data.style, c.model.level, c.model.pi, c.model.beta) for c in configs] == [
      (a.extra["style"], a.extra["level"], 0.3, 0.1) for a in arms]
  study.prepare()
  minutes = float(capsys.readouterr().out.split("about ")[1].split(" min")[0])
  assert 0 < minutes <= 25 and abs(minutes - study.estimate_s() / 60) < 1
  # 12 runs of 300 steps: run overhead, steps and 2 x 128 summaries each.
  assert study.estimate_s() == pytest.approx(12 * (20.0 + 300 * 0.29 + 256 * 0.01))


def test_quick_levels_study_writes_its_own_table(tmp_path):
  out = tmp_path / "out"
  assert reproduce.main(["--quick", "--study=levels", f"--out={out}"]) == 0
  assert not (out / "results.md").exists()  # the main study's files are not touched
  table = (out / "levels" / "results.md").read_text()
  for style in ("cnndm", "xsum"):
    for level in ("sentence", "token"):
      assert f"| {style} | {level} | 1 |" in table
  assert "Budget 0.4:" in table and "token minus sentence" in table and "XSum: token level better" in table
  results = json.loads((out / "levels" / "results.json").read_text())
  assert sorted((r["style"], r["level"]) for r in results["summary"]) == [
      ("cnndm", "sentence"), ("cnndm", "token"), ("xsum", "sentence"), ("xsum", "token")]
  gap = next(g for g in results["gaps"] if g["style"] == "xsum")
  rouge = {r["level"]: r["rougeL"] for r in results["summary"] if r["style"] == "xsum"}
  assert abs(gap["token_minus_sentence"] - (rouge["token"] - rouge["sentence"])) < 1e-9
  assert (out / "levels" / "rouge_by_level.png").stat().st_size > 0
