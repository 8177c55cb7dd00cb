"""Loaders for math-problem jsonl files (MATH, GSM8K, AIME/AMC, OlympiadBench, Minerva), as problem / answer /
solution / id records.

Each public layout names its fields differently, so a `Fields` mapping says which field is which; `LAYOUTS`
holds the common ones and `detect_layout` picks one from a file's first row:
- MATH (Hendrycks et al., 2021) rows carry `problem`, `solution` (ending in a `\\boxed{}` answer) and, in the
  MATH-500 split (Lightman et al., 2023), `answer`, `subject`, `level`, `unique_id`.
- GSM8K (Cobbe et al., 2021, section 2) rows carry `question` and `answer`, a worked solution with calculator
  annotations `<<48/2=24>>` and the final number after `####`; the answer is that number with thousands
  separators removed, the solution the text before it without the annotations. Only that `####` answer marks
  a file as GSM8K: other `question` / `answer` files (AMC) hold the bare answer.
- AIME / AMC rows carry `problem` or `question`, a numeric answer (AMC stores floats such as 27.0) and `id`.
- OlympiadBench rows carry `question`, `final_answer` (a list of `$...$` answers) and `solution` (a list).
- Minerva math rows carry `problem`, `solution` (a `\\boxed{}` answer) and `idx`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Mapping

from common.config import ConfigError
from common.data.jsonl import jsonl_objects
from common.eval.harness import GenerationExample
from common.eval.math_answers import last_boxed

MATH_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


@dataclasses.dataclass(frozen=True)
class MathProblem:
  problem: str
  answer: str     # the reference final answer (LaTeX for MATH, a plain number for GSM8K)
  solution: str   # a worked solution; "" when the file has none
  id: str
  subject: str = ""
  level: int = 0  # MATH difficulty 1-5; 0 when the format has none


@dataclasses.dataclass(frozen=True)
class Fields:
  """Which field of a row holds what. A row without the `answer` field takes the last `\\boxed{}` of its
  `solution`; one without the `id` field is named by its line number."""
  problem: str
  answer: str = "answer"
  solution: str | None = "solution"
  id: str | None = "id"
  gsm8k_answer: bool = False  # `answer` is a worked solution ending in '#### <number>'


LAYOUTS = {
    "math": Fields("problem", id="unique_id"),
    "gsm8k": Fields("question", solution=None, id="idx", gsm8k_answer=True),
    "aime": Fields("problem"),
    "amc": Fields("question"),
    "olympiadbench": Fields("question", answer="final_answer"),
    "minerva": Fields("problem", id="idx"),
}


def _rows(path: str) -> Iterator[tuple[int, dict]]:
  return jsonl_objects(path, ConfigError)


def detect_layout(row: Mapping) -> str | None:
  """The name of the layout a row is in, None when no layout fits. GSM8K needs its `####` answer."""
  answer = row.get("answer")
  if "question" in row and isinstance(answer, str) and "####" in answer:
    return "gsm8k"
  if "final_answer" in row:
    return "olympiadbench"
  if "problem" in row:
    return "minerva" if "idx" in row else "aime" if "id" in row else "math"
  return "amc" if "question" in row else None


def _resolve(layout: str | Fields | Mapping | None, path: str) -> tuple[str, Fields]:
  """(name for messages, mapping) of what the caller asked for; None detects from the first row."""
  if isinstance(layout, Fields):
    return "given", layout
  if isinstance(layout, Mapping):
    try:
      return "given", Fields(**layout)
    except TypeError as e:
      raise ConfigError(f"field mapping {dict(layout)}: {e} (fields: "
                        f"{[f.name for f in dataclasses.fields(Fields)]})") from None
  if layout is not None:
    if layout not in LAYOUTS:
      raise ConfigError(f"layout '{layout}': not one of {sorted(LAYOUTS)}")
    return layout, LAYOUTS[layout]
  for line_no, row in _rows(path):
    name = detect_layout(row)
    if name is None:
      raise ConfigError(f"{path}:{line_no}: no known layout has fields {sorted(row)}; pass one of "
                        f"{sorted(LAYOUTS)} or a field mapping")
    return name, LAYOUTS[name]
  raise ConfigError(f"{path}: no problems in the file")


def _text(value, where: str, key: str) -> str:
  """A field as text: numbers without a spurious '.0' (AMC's 27.0 is 27), lists (OlympiadBench) joined,
  one `$...$` around the whole dropped."""
  if isinstance(value, list) and value:
    return ", ".join(_text(item, where, key) for item in value)
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str):
    raise ConfigError(f"{where}: '{key}' should be a string, a number or a list of them, got {value!r:.60}")
  value = value.strip()
  return value[1:-1].strip() if len(value) > 1 and value[0] == value[-1] == "$" else value


def _problem(row: dict, fields: Fields, path: str, line_no: int, layout: str) -> MathProblem:
  where = f"{path}:{line_no}"

  def missing(key: str, extra: str = "") -> ConfigError:
    return ConfigError(f"{where}: missing field '{key}'{extra} ({layout} layout; the row has {sorted(row)})")

  if fields.problem not in row:
    raise missing(fields.problem)
  if not isinstance(row[fields.problem], str):
    raise ConfigError(f"{where}: '{fields.problem}' should be a str, got {row[fields.problem]!r:.60}")
  solution = row.get(fields.solution, "") if fields.solution else ""
  solution = "\n\n".join(solution) if isinstance(solution, list) else solution
  if not isinstance(solution, str):
    raise ConfigError(f"{where}: '{fields.solution}' should be a str or a list of them, got {solution!r:.60}")
  if fields.answer in row:
    answer = _text(row[fields.answer], where, fields.answer)
  elif (boxed := last_boxed(solution)) is not None:
    answer = boxed.strip()
  else:
    raise missing(fields.answer, f" (nor a \\boxed{{}} answer in '{fields.solution}')" if fields.solution else "")
  if fields.gsm8k_answer:
    if answer.count("####") != 1:
      raise ConfigError(f"{where}: '{fields.answer}' should end with one '#### <number>'")
    solution, answer = answer.split("####")
    solution, answer = _CALCULATOR_ANNOTATION.sub("", solution).strip(), answer.strip().replace(",", "")
    if not answer:
      raise ConfigError(f"{where}: nothing after '####' in '{fields.answer}'")
  if not answer:
    raise ConfigError(f"{where}: empty answer in '{fields.answer}'")
  id_value = row[fields.id] if fields.id in row else line_no
  if not isinstance(id_value, (str, int)) or isinstance(id_value, bool):
    raise ConfigError(f"{where}: '{fields.id}' should be a string or an integer, got {id_value!r:.60}")
  return MathProblem(row[fields.problem], answer, solution, str(id_value), subject=str(row.get("subject", "")),
                     level=_level(row.get("level", 0)))


def _level(value) -> int:
  """MATH-500 stores 3, the original MATH release "Level 3"; anything else has no level (0)."""
  if isinstance(value, int):
    return value
  digits = re.search(r"\d+", str(value))
  return int(digits.group(0)) if digits else 0


def load_math_problems(path: str, layout: str | Fields | Mapping | None = None) -> list[MathProblem]:
  """The problems of a jsonl file in `layout`: a name from `LAYOUTS`, a `Fields` mapping or a dict of its
  fields (`{"problem": "prompt", "answer": "target"}`); None detects it from the first row."""
  name, fields = _resolve(layout, path)
  problems = [_problem(row, fields, path, line_no, name) for line_no, row in _rows(path)]
  if not problems:
    raise ConfigError(f"{path}: no problems in the file")
  return problems


def load_math(path: str) -> list[MathProblem]:
  """MATH / MATH-500 jsonl: `problem` and `answer` (or a `\\boxed{}` `solution`); `subject`, `level`,
  `unique_id` kept when present (the id defaults to the line number)."""
  return load_math_problems(path, "math")


def load_gsm8k(path: str) -> list[MathProblem]:
  """GSM8K jsonl: `question` and `answer` ('... #### 1,234'); `idx` kept as the id when present."""
  return load_math_problems(path, "gsm8k")


def generation_examples(problems: list[MathProblem],
                        template: str = MATH_PROMPT) -> list[GenerationExample]:
  """Prompts for the harness: `template` formatted with the problem, the answer as the reference."""
  return [GenerationExample(template.format(problem=p.problem), (p.answer,)) for p in problems]
