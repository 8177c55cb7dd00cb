"""Answer filters: the final answer a generation states, as text to compare with a reference; None when the
generation states none.

GSM8K (Cobbe et al., 2021) solutions end in `#### N`. `strict-match` reads that N only, so it credits a model
that keeps the format of the few-shot examples; `flexible-extract` reads the last number anywhere in the
output, so it credits the arithmetic without the format. Both drop what does not change a number's value
here (thousands separators, a dollar sign, a trailing period). `boxed` reads the last `\\boxed{}` of a MATH
solution (Hendrycks et al., 2021, Sec. 3), through `common.eval.math_answers.last_boxed`.
"""
from __future__ import annotations

import re
from typing import Callable

from common.eval.math_answers import last_boxed

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_STRICT = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str:
  """'$1,234.' -> '1234': separators, currency and a final period dropped."""
  return text.replace(",", "").replace("$", "").rstrip(".")


def strict_match(output: str) -> str | None:
  """The number after the first `####`."""
  match = _STRICT.search(output)
  return normalize_number(match.group(1)) if match else None


def flexible_extract(output: str) -> str | None:
  """The last number of the output."""
  numbers = _ANY_NUMBER.findall(output)
  return normalize_number(numbers[-1]) if numbers else None


def boxed(output: str) -> str | None:
  """The content of the last `\\boxed{}`."""
  answer = last_boxed(output)
  return answer.strip() if answer is not None else None


FILTERS: dict[str, Callable[[str], str | None]] = {
    "strict-match": strict_match,
    "flexible-extract": flexible_extract,
    "boxed": boxed,
}
