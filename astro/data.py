"""The problems ASTRO searches and trains on: generated multi-step arithmetic word problems with exact integer
answers (difficulty: the number of steps and of distractor sentences), their step format (one step a line,
the last one stating `\\boxed{answer}`), sampled step-by-step solutions with injected errors (the imperfect
base policy's SFT data), the verifier (final answer against the gold one) and the real-data path (MATH-500 /
AIME / AMC / GSM8K jsonl through `common.eval.math_data`).
"""
from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

import numpy as np

from common.config import ConfigError, DataError
from common.eval.math_answers import last_boxed, math_equivalent
from common.eval.math_data import load_math_problems

DELIMITER = "\n"  # ends every step
_NAMES = ("Ann", "Bob", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kim", "Lea")
_ITEMS = ("apples", "coins", "cards", "shells", "books", "pens", "stamps", "beads", "marbles", "hats")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  answer: str
  difficulty: int  # generated: the number of steps; MATH: its level (0 when the file has none)
  steps: tuple[str, ...] = ()  # the gold solution's steps, answer line last ('' for real data)
  distractors: int = 0


def prompt_of(problem: Problem) -> str:
  """The text a policy continues with its steps (the SFT prompt, the search's root)."""
  return f"Q: {problem.question}{DELIMITER}"


def answer_step(answer: str) -> str:
  return f"Answer: \\boxed{{{answer}}}"


def is_answer_step(step: str) -> bool:
  return "\\boxed{" in step


def _chain(rng: np.random.Generator, n_steps: int) -> tuple[int, list[tuple[str, int, str]]]:
  """A start value and n operations (op, operand, phrase) on one-digit operands whose running values stay in
  1..99: arithmetic a small model learns in minutes, so that search and RL have signal."""
  value = int(rng.integers(2, 10))
  start, ops = value, []
  while len(ops) < n_steps:
    kind = int(rng.integers(3))
    if kind == 0:
      n = int(rng.integers(2, 10))
      ops.append(("+", n, f"gets {n} more"))
      value += n
    elif kind == 1 and value > 3:
      n = int(rng.integers(1, min(value, 10)))
      ops.append(("-", n, f"gives away {n}"))
      value -= n
    elif kind == 2 and value <= 12:
      n = int(rng.integers(2, 4))
      ops.append(("*", n, {2: "doubles them", 3: "triples them"}[n]))
      value *= n
  return start, ops


def make_problem(rng: np.random.Generator, n_steps: int, n_distractors: int) -> Problem:
  """One word problem: a person's count of an item changed by `n_steps` operations, with `n_distractors`
  sentences about other people's items among them; its gold steps are `a op b = c` lines."""
  name, other = (str(x) for x in rng.choice(_NAMES, size=2, replace=False))
  item, other_item = (str(x) for x in rng.choice(_ITEMS, size=2, replace=False))
  start, ops = _chain(rng, n_steps)
  sentences = [f"{name} has {start} {item}."] + [f"{name} {phrase}." for _, _, phrase in ops]
  for _ in range(n_distractors):
    at = int(rng.integers(1, len(sentences) + 1))
    sentences.insert(at, f"{other} has {int(rng.integers(2, 10))} {other_item}.")
  steps, value = [], start
  for op, n, _ in ops:
    result = value + n if op == "+" else value - n if op == "-" else value * n
    steps.append(f"{value}{op}{n}={result}")
    value = result
  question = " ".join(sentences) + f" How many {item} now?"
  return Problem(question, str(value), n_steps, tuple(steps) + (answer_step(str(value)),), n_distractors)


def generate_problems(n: int, seed: int, *, min_steps: int, max_steps: int, max_distractors: int,
                      exclude: frozenset[str] = frozenset()) -> list[Problem]:
  """`n` distinct problems, a pure function of the arguments; difficulty cycles through min..max steps so
  every level is equally present; questions in `exclude` (another split's) are skipped."""
  rng = np.random.default_rng(seed)
  out, seen = [], set(exclude)
  while len(out) < n:
    steps = min_steps + len(out) % (max_steps - min_steps + 1)
    problem = make_problem(rng, steps, int(rng.integers(0, max_distractors + 1)))
    if problem.question not in seen:
      seen.add(problem.question)
      out.append(problem)
  return out


def noisy_solution(problem: Problem, rng: np.random.Generator, error_rate: float) -> list[str]:
  """The gold steps, where each step's result is off by 1-3 with probability `error_rate` and the later
  steps carry the wrong value on: the imperfect demonstrations the base policy is fine-tuned on."""
  pattern = re.compile(r"^(\d+)([+*-])(\d+)=(\d+)$")
  steps, carried = [], None
  for step in problem.steps[:-1]:
    a, op, b, _ = pattern.match(step).groups()
    a = carried if carried is not None else int(a)
    result = a + int(b) if op == "+" else a - int(b) if op == "-" else a * int(b)
    if rng.random() < error_rate:
      result += int(rng.choice([-3, -2, -1, 1, 2, 3]))
    steps.append(f"{a}{op}{b}={result}")
    carried = result
  return steps + [answer_step(str(carried))]


def solution_text(steps: list[str] | tuple[str, ...]) -> str:
  return DELIMITER.join(steps)


def _as_number(text: str) -> Fraction | None:
  text = text.strip().replace(",", "")
  return Fraction(text) if _NUMBER.match(text) else None


def same_answer(a: str | None, b: str | None) -> bool:
  """Answer equality: plain numbers ('1/2', '0.5', '3') by value, anything else by `math_equivalent`."""
  if a is None or b is None:
    return False
  x, y = _as_number(a), _as_number(b)
  if x is not None and y is not None:
    return x == y
  return math_equivalent(a, b)


def final_answer(generation: str) -> str | None:
  """The answer a solution states: its last `\\boxed{}` (a backtracking trace may box a wrong one first)."""
  boxed = last_boxed(generation)
  return boxed.strip() if boxed is not None else None


def verify(problem: Problem, generation: str) -> bool:
  """The verifier of search leaves and RL rewards: the solution's final answer against the gold one."""
  return same_answer(problem.answer, final_answer(generation))


def load_problems(path: str, layout: str = "", key: str = "data.path") -> list[Problem]:
  """MATH-500 / AIME / AMC / GSM8K (or a field mapping) jsonl as problems; errors name `key`, file and line."""
  try:
    rows = load_math_problems(path, layout or None)
  except (ConfigError, DataError, OSError) as e:
    raise ConfigError(f"config key '{key}': {e}") from None
  if not rows:
    raise ConfigError(f"config key '{key}': '{path}' holds no problems")
  return [Problem(p.problem, p.answer, p.level) for p in rows]


def problem_sets(data_cfg) -> tuple[list[Problem], list[Problem]]:
  """(train, test): generated (disjoint by question) or read (`data.path` for training problems,
  `data.test_path` for the held-out ones; '' = the same file)."""
  if data_cfg.path:
    train = load_problems(data_cfg.path, data_cfg.layout)
    test = load_problems(data_cfg.test_path, data_cfg.layout, "data.test_path") if data_cfg.test_path else train
    return train[:int(data_cfg.num_train_problems)], test[:int(data_cfg.num_test_problems)]
  shape = dict(min_steps=int(data_cfg.min_steps), max_steps=int(data_cfg.max_steps),
               max_distractors=int(data_cfg.max_distractors))
  test = generate_problems(int(data_cfg.num_test_problems), int(data_cfg.problem_seed) + 1, **shape)
  train = generate_problems(int(data_cfg.num_train_problems), int(data_cfg.problem_seed), **shape,
                            exclude=frozenset(p.question for p in test))
  return train, test
