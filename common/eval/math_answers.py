"""Math-answer equivalence: the final answer of a solution, compared as mathematics, not as text.

MATH (Hendrycks et al., 2021, section 3) marks a solution's final answer with `\\boxed{...}`; models
prompted the same way are graded on their last boxed answer. Two answers are equal when math-verify
(Kydlíček, Hugging Face) parses both LaTeX strings into SymPy objects and finds them equal symbolically
or numerically: `\\dfrac{1}{2}`, `\\frac12`, `0.5` and `1/2` are one answer; intervals keep their open
and closed ends; `90^\\circ` equals `90`; `\\text{Evelyn}` is compared as text; unordered lists such as
`1,-2` are sets. Answers that differ only in typesetting (spaces, `\\left`, a trailing period, `\\text{27}`)
are equal as text before anything is parsed. Parsing runs in worker processes with a time limit per
answer (see `worker_pool`), so grading is bounded in any thread.
"""
from __future__ import annotations

import functools
import os
import re

from common.eval import worker_pool

GRADING_TIMEOUT_S = 5.0  # per answer; past it the answer is graded wrong

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)\b\s*")
_UNBRACED_ARGUMENT = re.compile(r"[^\s$]+")  # `\boxed 5`: the argument runs to a space or `$`


def _boxed_at(text: str, start: int) -> tuple[str, int] | None:
  """The argument of the box command whose name ends before `start`, and the index after it."""
  if start < len(text) and text[start] == "{":
    depth = 0
    for pos in range(start, len(text)):
      if text[pos] == "{":
        depth += 1
      elif text[pos] == "}":
        depth -= 1
        if depth == 0:
          return text[start + 1:pos], pos + 1
    return None  # unbalanced braces: no complete answer
  match = _UNBRACED_ARGUMENT.match(text, start)
  return (match.group(0), match.end()) if match else None


def last_boxed(text: str) -> str | None:
  """Content of the last top-level `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced;
  None when there is none. A box nested inside another box belongs to the outer one."""
  found, pos = None, 0
  while (match := _BOX_COMMAND.search(text, pos)) is not None:
    argument = _boxed_at(text, match.end())
    if argument is None:
      pos = match.end()
      continue
    found, pos = argument
  return found


_TEXT_AROUND_PLAIN = re.compile(r"\\(?:text|textrm|mbox)\{([^{}\\]*)\}")
_NUMBER = r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)"
_TEXT_AROUND_NUMBER = re.compile(r"\\(?:text|textrm|mbox)\{\s*(" + _NUMBER + r")\s*\}")
_TRIVIAL_LATEX = re.compile(r"\\(?:left|right)\.|\\(?:left|right)(?![a-zA-Z])|\\[!,;: ]|\\?\$|\\?%")
_TRAILING_PERIOD = re.compile(r"(?<![.\\])\.\s*$")
_SYNONYMS = {r"\le": r"\leq", r"\ge": r"\geq", r"\ne": r"\neq", r"\mid": "|", r"\dfrac": r"\frac",
             r"\tfrac": r"\frac"}
_SYNONYM = re.compile(r"\\(?:le|ge|ne|mid|dfrac|tfrac)(?![a-zA-Z])")


def _canonical(answer: str) -> str:
  """The answer with its typesetting-only parts removed: `$` and `\\$`, `\\left`/`\\right`, thin spaces,
  `\\text{}` around a number, one spelling of `\\frac`, `\\leq`, `\\neq`, `|`, a trailing period, and the
  percent sign: a percent answer is the number before its sign (`50\\%` is `50`, not `0.5`), as units such as
  `^\\circ` are."""
  answer = _TRIVIAL_LATEX.sub("", answer)
  answer = _SYNONYM.sub(lambda match: _SYNONYMS[match.group(0)], _TEXT_AROUND_NUMBER.sub(r"\1", answer))
  return " ".join(_TRAILING_PERIOD.sub("", answer).split())


def _string_key(answer: str) -> str:
  """What two answers equal as text share: the canonical form without spaces or `\\text{}` wrappers."""
  return "".join(_TEXT_AROUND_PLAIN.sub(r"\1", answer).split())


@functools.lru_cache(maxsize=65536)
def _parse_answer(answer: str) -> tuple:
  """SymPy forms of one canonical answer (plus its string, for math-verify's text fallback). Only
  LaTeX extraction of the whole box: math-verify's default also looks for any number in the text and
  would reduce `\\{x|-2\\leq x < 1\\}` to `1`; an answer that does not parse whole stays a string."""
  import math_verify  # pylint: disable=g-import-not-at-top
  structured = [math_verify.LatexExtractionConfig(boxed_match_priority=0)]
  return tuple(math_verify.parse("\\boxed{" + answer + "}", structured))


def _equivalent_in_worker(reference: str, prediction: str) -> bool:
  """Runs in a pool worker's main thread, where math-verify's own SIGALRM bound works."""
  import math_verify  # pylint: disable=g-import-not-at-top
  gold, target = _parse_answer(reference), _parse_answer(prediction)
  return bool(gold and target and math_verify.verify(list(gold), list(target)))


def _extract_in_worker(generation: str) -> str | None:
  import math_verify  # pylint: disable=g-import-not-at-top
  parsed = math_verify.parse(generation)
  return parsed[-1].strip() if parsed and isinstance(parsed[-1], str) else None


@functools.cache
def default_pool() -> worker_pool.WorkerPool:
  """The processes that parse and compare answers for this module, started on first use."""
  return worker_pool.WorkerPool(workers=min(4, os.cpu_count() or 1), timeout_s=GRADING_TIMEOUT_S)


def _answer_of(text: str) -> str:
  boxed = last_boxed(text)
  return _canonical(boxed if boxed is not None else text)


def extract_math_answer(generation: str, pool: worker_pool.WorkerPool | None = None) -> str | None:
  """The final answer a generation states: its last box; without one, what math-verify's extraction
  finds in the prose ("the final answer is ...", the last LaTeX expression or number); None if nothing
  or if the extraction runs past the pool's time limit."""
  boxed = last_boxed(generation)
  if boxed is not None:
    return boxed.strip()
  try:
    return (pool or default_pool()).call(_extract_in_worker, generation)
  except (TimeoutError, ChildProcessError):
    return None


def math_equivalent(reference: str, prediction: str, pool: worker_pool.WorkerPool | None = None) -> bool:
  """Whether two answers are the same mathematical object. Each is a bare LaTeX answer or a text whose
  last `\\boxed{}` holds it (a whole reference solution may be passed). Equal canonical text is equal;
  otherwise both are parsed in `pool` (default: `default_pool()`), and an answer whose grading runs past
  its time limit is wrong. The reference goes first: math-verify's comparison is not symmetric in every
  edge case (assignments, equations vs intervals)."""
  gold, target = _answer_of(reference), _answer_of(prediction)
  if not gold or not target:
    return False
  if _string_key(gold) == _string_key(target):
    return True
  try:
    return (pool or default_pool()).call(_equivalent_in_worker, gold, target)
  except (TimeoutError, ChildProcessError):
    return False
