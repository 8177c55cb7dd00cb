"""MATH and GSM8K loaders on the real files and on small hand-written ones."""
from __future__ import annotations

import json
import pathlib

import pytest

from common.config import ConfigError
from common.eval import math_data

DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "math"


def _real(name: str) -> str:
  path = DATA / name
  if not path.is_file():
    pytest.skip(f"{path} is not here (the shared evaluation data sits beside the repository)")
  return str(path)


def test_gsm8k_loader_on_the_real_file():
  problems = math_data.load_gsm8k(_real("gsm8k_test.jsonl"))
  assert len(problems) == 1319
  first = problems[0]
  assert first.problem.startswith("Janet\u2019s ducks lay 16 eggs per day.")
  assert first.answer == "18"
  assert first.solution.startswith("Janet sells 16 - 3 - 4 = 9 duck eggs a day.")  # no <<...>> left
  assert "####" not in first.solution and "<<" not in first.solution
  assert first.id == "0"
  # Every answer is a plain (possibly negative) integer once thousands separators are gone.
  assert all(p.answer.lstrip("-").isdigit() for p in problems)
  raw = [json.loads(line) for line in open(DATA / "gsm8k_test.jsonl", encoding="utf-8")]
  with_commas = [(r["answer"].split("####")[1].strip(), p.answer) for r, p in zip(raw, problems)
                 if "," in r["answer"].split("####")[1]]
  assert with_commas and all(a.replace(",", "") == b for a, b in with_commas)


def test_math500_loader_keeps_metadata():
  problems = math_data.load_math(_real("math500_test.jsonl"))
  first = problems[0]
  assert first.answer == r"\left( 3, \frac{\pi}{2} \right)"
  assert first.subject == "Precalculus" and first.level == 2 and first.id == "test/precalculus/807.json"
  assert {p.level for p in problems} == {1, 2, 3, 4, 5}


def test_load_math_problems_tells_the_formats_apart(tmp_path):
  gsm = tmp_path / "gsm.jsonl"
  gsm.write_text(json.dumps({"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}) + "\n")
  math = tmp_path / "math.jsonl"
  math.write_text(json.dumps({"problem": "p", "solution": r"so \boxed{3}", "answer": "3",
                              "level": "Level 4"}) + "\n\n")
  assert math_data.load_math_problems(str(gsm))[0] == math_data.MathProblem("1+1?", "2", "1+1=2", "1")
  loaded = math_data.load_math_problems(str(math))[0]
  assert (loaded.answer, loaded.level, loaded.id) == ("3", 4, "1")


@pytest.mark.parametrize("content,message", [
    ('{"question": "q", "answer": "no marker"}\n', r"bad\.jsonl:1: 'answer' should end with one '####"),
    ('{"question": "q", "answer": "x ####  "}\n', r"bad\.jsonl:1: nothing after '####'"),
    ('{"question": "q", "answer": "#### 1"}\n{oops\n', r"bad\.jsonl:2: not a JSON object"),
    ('{"answer": "#### 1", "question": 7}\n', r"bad\.jsonl:1: 'question' should be a str"),
    ("", r"bad\.jsonl: no problems"),
])
def test_bad_gsm8k_files_name_the_path_and_line(tmp_path, content, message):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(content)
  with pytest.raises(ConfigError, match=message):
    math_data.load_gsm8k(str(bad))


def test_bad_math_files_name_the_path(tmp_path):
  with pytest.raises(ConfigError, match=r"missing\.jsonl: no such file"):
    math_data.load_math(str(tmp_path / "missing.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
  with pytest.raises(ConfigError, match=r"bad\.jsonl:1: missing key 'solution'"):
    math_data.load_math(str(bad))
  other = tmp_path / "other.jsonl"
  other.write_text(json.dumps({"text": "hello"}) + "\n")
  with pytest.raises(ConfigError, match=r"other\.jsonl:1: neither MATH"):
    math_data.load_math_problems(str(other))


def test_generation_examples_format_the_prompt():
  problem = math_data.MathProblem("What is 1+1?", "2", "1+1=2", "a")
  (example,) = math_data.generation_examples([problem])
  assert example.prompt == ("What is 1+1?\nPlease reason step by step, and put your final answer "
                            "within \\boxed{}.")
  assert example.references == ("2",)
