"""The problems and the verifier: generated problems whose gold steps compute their answer, noisy solutions
that carry an injected error to a wrong answer, the verifier on equivalent spellings of an answer, and the
MATH-500 / GSM8K readers as the real-data path."""
import os
import re

import numpy as np
import pytest

from astro import data as astro_data
from common.config import ConfigError

SHARED = "/work/shared/data"


def test_gold_steps_compute_the_answer_and_difficulty_is_the_number_of_steps():
  problems = astro_data.generate_problems(60, 0, min_steps=2, max_steps=4, max_distractors=1)
  assert {p.difficulty for p in problems} == {2, 3, 4}
  for p in problems:
    assert len(p.steps) == p.difficulty + 1 and astro_data.verify(p, astro_data.solution_text(p.steps))
    values = [int(re.match(r"^(\d+)[+*-](\d+)=(\d+)$", s).group(3)) for s in p.steps[:-1]]
    assert str(values[-1]) == p.answer and all(0 < v < 100 for v in values)
    assert p.question.count(" has ") == 1 + p.distractors


def test_train_and_test_problems_are_disjoint_and_reproducible():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(path="", num_train_problems=200, num_test_problems=50, min_steps=2,
                                       max_steps=3, max_distractors=1, problem_seed=4))
  train, test = astro_data.problem_sets(cfg)
  assert not {p.question for p in train} & {p.question for p in test}
  assert astro_data.problem_sets(cfg) == (train, test)


def test_noisy_solutions_carry_an_injected_error_to_a_wrong_answer():
  [p] = astro_data.generate_problems(1, 1, min_steps=3, max_steps=3, max_distractors=0)
  assert astro_data.noisy_solution(p, np.random.default_rng(0), 0.0) == list(p.steps)
  wrong = astro_data.noisy_solution(p, np.random.default_rng(0), 1.0)
  assert not astro_data.verify(p, astro_data.solution_text(wrong))
  a, op, b, c = re.match(r"^(\d+)([+*-])(\d+)=(\d+)$", wrong[1]).groups()
  assert int(a) == int(wrong[0].split("=")[1])  # the next step starts from the wrong value


@pytest.mark.parametrize("gold, generation, right", [
    ("0.5", "so \\boxed{1/2}", True), ("1/2", "\\boxed{0.5}", True), ("3", "\\boxed{3}", True),
    ("3", "\\boxed{3.0}", True), ("\\frac{1}{2}", "\\boxed{0.5}", True), ("1,000", "\\boxed{1000}", True),
    ("3", "\\boxed{4}", False), ("3", "3", False),  # no box: no stated answer
    ("4", "x\nAnswer: \\boxed{5}\nThat is wrong. Let me start over.\nAnswer: \\boxed{4}", True),  # the last box
    ("5", "x\nAnswer: \\boxed{5}\nThat is wrong. Let me start over.\nAnswer: \\boxed{4}", False),
])
def test_the_verifier_judges_the_last_boxed_answer_by_value(gold, generation, right):
  assert astro_data.verify(astro_data.Problem("q", gold, 1), generation) is right


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="the shared data folder is absent")
def test_math500_and_gsm8k_files_load_as_problems():
  math500 = next(os.path.join(r, f) for r, _, fs in os.walk(SHARED) for f in fs if "500" in f and f.endswith("jsonl"))
  problems = astro_data.load_problems(math500)
  assert len(problems) == 500 and all(p.answer and 1 <= p.difficulty <= 5 for p in problems)
  gsm = next(os.path.join(r, f) for r, _, fs in os.walk(SHARED) for f in fs if "gsm" in f.lower() and
             f.endswith("jsonl"))
  assert all(re.match(r"^-?[\d.,]+$", p.answer) for p in astro_data.load_problems(gsm, "gsm8k")[:50])


def test_a_malformed_line_is_named_by_file_and_line(tmp_path):
  path = tmp_path / "math.jsonl"
  path.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?" "answer": "4"}\n')
  with pytest.raises(ConfigError, match=f"data.path.*{path}:2"):
    astro_data.load_problems(str(path))
  with pytest.raises(ConfigError, match="data.path.*no/such.jsonl"):
    astro_data.load_problems("/no/such.jsonl")
