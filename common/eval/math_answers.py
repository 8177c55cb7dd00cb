"""Math-answer equivalence: the final answer of a solution, compared as mathematics, not as text.

MATH (Hendrycks et al., 2021, section 3) marks a solution's final answer with `\\boxed{...}`; models
prompted the same way are graded on their last boxed answer. Two answers are equal when math-verify
(Kydlíček, Hugging Face) parses both LaTeX strings into SymPy objects and finds them equal symbolically
or numerically: `\\dfrac{1}{2}`, `\\frac12`, `0.5` and `1/2` are one answer; intervals keep their open
and closed ends; `90^\\circ` equals `90`; `\\text{Evelyn}` is compared as text; unordered lists such as
`1,-2` are sets. Math-verify bounds each parse with SIGALRM, which only the main thread may use, so in
other threads it runs without that bound.
"""
from __future__ import annotations

import functools
import re
import threading

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


def _timeout_s() -> int | None:
  """math-verify's per-call bound; None (unbounded) off the main thread, where SIGALRM is unavailable."""
  return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=65536)
def _parse_answer(answer: str) -> tuple:
  """SymPy forms of one bare answer (plus its string, for math-verify's text fallback)."""
  import math_verify  # pylint: disable=g-import-not-at-top
  return tuple(math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=_timeout_s()))


def _answer_of(text: str) -> str:
  boxed = last_boxed(text)
  return (boxed if boxed is not None else text).strip()


def extract_math_answer(generation: str) -> str | None:
  """The final answer a generation states: its last box; without one, what math-verify's extraction
  finds in the prose ("the final answer is ...", the last LaTeX expression or number); None if nothing."""
  boxed = last_boxed(generation)
  if boxed is not None:
    return boxed.strip()
  import math_verify  # pylint: disable=g-import-not-at-top
  parsed = math_verify.parse(generation, parsing_timeout=_timeout_s())
  return parsed[-1].strip() if parsed and isinstance(parsed[-1], str) else None


def math_equivalent(reference: str, prediction: str) -> bool:
  """Whether two answers are the same mathematical object. Each is a bare LaTeX answer or a text whose
  last `\\boxed{}` holds it (a whole reference solution may be passed). The reference goes first:
  math-verify's comparison is not symmetric in every edge case (assignments, equations vs intervals)."""
  import math_verify  # pylint: disable=g-import-not-at-top
  gold, target = _parse_answer(_answer_of(reference)), _parse_answer(_answer_of(prediction))
  if not gold or not target:
    return False
  return bool(math_verify.verify(list(gold), list(target), timeout_seconds=_timeout_s()))
