"""Loaders for the MATH and GSM8K jsonl formats, as problem / answer / solution records.

MATH (Hendrycks et al., 2021) rows carry `problem`, `solution` (ending in a `\\boxed{}` answer),
`answer`, `subject`, `level`, `unique_id`; the MATH-500 split (Lightman et al., 2023) uses that format.
GSM8K (Cobbe et al., 2021, section 2) rows carry `question` and `answer`, a worked solution with
calculator annotations `<<48/2=24>>` and the final number after `####`; the answer is that number with
thousands separators removed, the solution the text before it without the annotations.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator

from common.config import ConfigError
from common.data.jsonl import jsonl_objects
from common.eval.harness import GenerationExample

MATH_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


@dataclasses.dataclass(frozen=True)
class MathProblem:
  problem: str
  answer: str     # the reference final answer (LaTeX for MATH, a plain number for GSM8K)
  solution: str   # a worked solution
  id: str
  subject: str = ""
  level: int = 0  # MATH difficulty 1-5; 0 when the format has none


def _rows(path: str) -> Iterator[tuple[int, dict]]:
  return jsonl_objects(path, ConfigError)


def _field(row: dict, key: str, path: str, line_no: int, kind: type = str):
  if key not in row:
    raise ConfigError(f"{path}:{line_no}: missing key '{key}' (have {sorted(row)})")
  if not isinstance(row[key], kind):
    raise ConfigError(f"{path}:{line_no}: '{key}' should be a {kind.__name__}, got {row[key]!r:.60}")
  return row[key]


def _nonempty(problems: list[MathProblem], path: str) -> list[MathProblem]:
  if not problems:
    raise ConfigError(f"{path}: no problems in the file")
  return problems


def _level(value) -> int:
  """MATH-500 stores 3, the original MATH release "Level 3"; anything else has no level (0)."""
  if isinstance(value, int):
    return value
  digits = re.search(r"\d+", str(value))
  return int(digits.group(0)) if digits else 0


def load_math(path: str) -> list[MathProblem]:
  """MATH / MATH-500 jsonl: `problem`, `solution`, `answer` required; `subject`, `level`, `unique_id`
  kept when present (the id defaults to the line number)."""
  problems = []
  for line_no, row in _rows(path):
    problems.append(MathProblem(
        problem=_field(row, "problem", path, line_no),
        answer=_field(row, "answer", path, line_no),
        solution=_field(row, "solution", path, line_no),
        id=str(row.get("unique_id", line_no)),
        subject=str(row.get("subject", "")),
        level=_level(row.get("level", 0))))
  return _nonempty(problems, path)


def load_gsm8k(path: str) -> list[MathProblem]:
  """GSM8K jsonl: `question` and `answer` ('... #### 1,234'); `idx` kept as the id when present."""
  problems = []
  for line_no, row in _rows(path):
    worked = _field(row, "answer", path, line_no)
    if worked.count("####") != 1:
      raise ConfigError(f"{path}:{line_no}: 'answer' should end with one '#### <number>'")
    solution, final = worked.split("####")
    answer = final.strip().replace(",", "")
    if not answer:
      raise ConfigError(f"{path}:{line_no}: nothing after '####' in 'answer'")
    problems.append(MathProblem(
        problem=_field(row, "question", path, line_no),
        answer=answer,
        solution=_CALCULATOR_ANNOTATION.sub("", solution).strip(),
        id=str(row.get("idx", line_no))))
  return _nonempty(problems, path)


def load_math_problems(path: str) -> list[MathProblem]:
  """Either format, told apart by the first row's keys (`problem` for MATH, `question` for GSM8K)."""
  for line_no, row in _rows(path):
    if "problem" in row:
      return load_math(path)
    if "question" in row:
      return load_gsm8k(path)
    raise ConfigError(f"{path}:{line_no}: neither MATH ('problem') nor GSM8K ('question') format "
                      f"(keys {sorted(row)})")
  raise ConfigError(f"{path}: no problems in the file")


def generation_examples(problems: list[MathProblem],
                        template: str = MATH_PROMPT) -> list[GenerationExample]:
  """Prompts for the harness: `template` formatted with the problem, the answer as the reference."""
  return [GenerationExample(template.format(problem=p.problem), (p.answer,)) for p in problems]
