"""Math-problem loaders (MATH, GSM8K, AIME/AMC, OlympiadBench, Minerva layouts) on the real files and on small
hand-written ones."""
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


def _write(tmp_path, name: str, *rows) -> str:
  path = tmp_path / name
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def test_bad_math_files_name_the_path(tmp_path):
  with pytest.raises(ConfigError, match=r"missing\.jsonl: no such file"):
    math_data.load_math(str(tmp_path / "missing.jsonl"))
  other = _write(tmp_path, "other.jsonl", {"text": "hello"})
  with pytest.raises(ConfigError, match=r"other\.jsonl:1: no known layout has fields \['text'\]"):
    math_data.load_math_problems(other)
  with pytest.raises(ConfigError, match=r"layout 'mmlu': not one of"):
    math_data.load_math_problems(other, "mmlu")
  with pytest.raises(ConfigError, match=r"field mapping .*'question'"):
    math_data.load_math_problems(other, {"question": "text"})


# One hand-written row per public layout, and what it loads as: (problem, answer, solution, id).
LAYOUT_ROWS = [
    ("math", {"problem": "Find $x$.", "solution": r"So $x=\boxed{\frac{1}{2}}$.", "answer": r"\frac{1}{2}",
              "subject": "Algebra", "level": 3, "unique_id": "test/algebra/1.json"},
     ("Find $x$.", r"\frac{1}{2}", r"So $x=\boxed{\frac{1}{2}}$.", "test/algebra/1.json")),
    ("math", {"problem": "Add.", "solution": r"It is $\boxed{\{1, 2\}}$.", "level": "Level 2", "type": "Algebra"},
     ("Add.", r"\{1, 2\}", r"It is $\boxed{\{1, 2\}}$.", "1")),  # the original release: no `answer`
    ("gsm8k", {"question": "Eggs?", "answer": "She has 3*4=<<3*4=12>>12.\n#### 1,200", "idx": 7},
     ("Eggs?", "1200", "She has 3*4=12.", "7")),
    ("aime", {"id": 60, "problem": "Find N mod 1000.", "solution": "Long.", "answer": 204, "url": "u"},
     ("Find N mod 1000.", "204", "Long.", "60")),
    ("aime", {"id": 0, "problem": "Halve 5.", "question": "Halve 5.", "answer": 2.5},
     ("Halve 5.", "2.5", "", "0")),
    ("amc", {"id": 3, "question": "How many?", "answer": 27.0}, ("How many?", "27", "", "3")),
    ("olympiadbench", {"id": 2231, "question": "Find all pairs.", "solution": ["First.", "Second."],
                       "final_answer": ["$(1,2)$", "$(3,4)$"], "subject": "Math"},
     ("Find all pairs.", "(1,2), (3,4)", "First.\n\nSecond.", "2231")),
    ("minerva", {"problem": "Compute the mass.", "solution": r"Thus $\boxed{4.5e3}$ kg.", "type": "Physics",
                 "idx": 9},
     ("Compute the mass.", "4.5e3", r"Thus $\boxed{4.5e3}$ kg.", "9")),
]


@pytest.mark.parametrize("layout,row,expected", LAYOUT_ROWS)
def test_each_public_layout_is_detected_and_loaded(tmp_path, layout, row, expected):
  path = _write(tmp_path, "data.jsonl", row)
  assert math_data.detect_layout(row) == layout
  for loaded in (math_data.load_math_problems(path), math_data.load_math_problems(path, layout)):
    assert (loaded[0].problem, loaded[0].answer, loaded[0].solution, loaded[0].id) == expected


def test_question_answer_rows_are_not_misread_as_gsm8k(tmp_path):
  """GSM8K is told apart by its `####` answer, not by the `question` / `answer` field names."""
  path = _write(tmp_path, "amc.jsonl", {"id": 11, "question": "Sum?", "answer": "7"},
                {"id": 12, "question": "Half?", "answer": 0.25})
  assert [(p.answer, p.id, p.solution) for p in math_data.load_math_problems(path)] == [
      ("7", "11", ""), ("0.25", "12", "")]
  with pytest.raises(ConfigError, match=r"amc\.jsonl:1: 'answer' should end with one '####"):
    math_data.load_math_problems(path, "gsm8k")  # forcing the layout still checks it


def test_math_rows_need_no_solution_when_they_have_an_answer(tmp_path):
  path = _write(tmp_path, "math.jsonl", {"problem": "p", "answer": "1"})
  assert math_data.load_math(path) == [math_data.MathProblem("p", "1", "", "1")]


def test_a_row_missing_the_needed_field_names_the_file_line_and_field(tmp_path):
  path = _write(tmp_path, "mixed.jsonl", {"id": 1, "problem": "p", "answer": 5}, {"id": 2, "problem": "q"})
  with pytest.raises(ConfigError, match=r"mixed\.jsonl:2: missing field 'answer' \(nor a \\boxed\{\} answer in "
                                        r"'solution'\) \(aime layout; the row has \['id', 'problem'\]\)"):
    math_data.load_math_problems(path)
  path = _write(tmp_path, "olympiad.jsonl", {"question": "q", "final_answer": ["1"]}, {"question": "r"})
  with pytest.raises(ConfigError, match=r"olympiad\.jsonl:2: missing field 'final_answer'"):
    math_data.load_math_problems(path)
  path = _write(tmp_path, "gsm.jsonl", {"answer": "#### 3"})
  with pytest.raises(ConfigError, match=r"gsm\.jsonl:1: missing field 'question' \(gsm8k layout"):
    math_data.load_gsm8k(path)
  path = _write(tmp_path, "bool.jsonl", {"question": "q", "answer": True})
  with pytest.raises(ConfigError, match=r"bool\.jsonl:1: 'answer' should be a string, a number or a list"):
    math_data.load_math_problems(path)


def test_an_explicit_mapping_reads_any_field_names(tmp_path):
  path = _write(tmp_path, "custom.jsonl", {"uid": "a1", "prompt": "Two?", "target": 2.0, "worked": "1+1"})
  fields = {"problem": "prompt", "answer": "target", "solution": "worked", "id": "uid"}
  expected = [math_data.MathProblem("Two?", "2", "1+1", "a1")]
  assert math_data.load_math_problems(path, fields) == expected
  assert math_data.load_math_problems(path, math_data.Fields(**fields)) == expected


def test_generation_examples_format_the_prompt():
  problem = math_data.MathProblem("What is 1+1?", "2", "1+1=2", "a")
  (example,) = math_data.generation_examples([problem])
  assert example.prompt == ("What is 1+1?\nPlease reason step by step, and put your final answer "
                            "within \\boxed{}.")
  assert example.references == ("2",)
