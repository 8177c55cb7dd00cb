"""Few-shot prompts (Brown et al., 2020, Sec. 2): k solved examples from a task's pool, then the document.

The examples of a document are drawn by a generator seeded with (seed, task, document id) alone, so a
document's prompt does not depend on which other documents are evaluated, in what order, or with what
`--limit`; that is what lets a resumed run reuse the lines it has. The evaluated document itself is never one
of its examples, even when it appears in the pool under another id: a pool document with the same question
(or text) is left out.
"""
from __future__ import annotations

import collections
import random

from common.config import ConfigError
from common.eval.tasks import Doc, Task


def _content(doc: Doc) -> tuple[str, str]:
  return doc.question, doc.text


def check_pool(task: Task, pool: list[Doc], docs: list[Doc], num_fewshot: int) -> None:
  """Refuses `num_fewshot` larger than what the pool offers some document (the pool less that document)."""
  if num_fewshot < 0:
    raise ConfigError(f"--num_fewshot={num_fewshot}: must be >= 0")
  if not num_fewshot:
    return
  counts = collections.Counter(_content(d) for d in pool)
  fewest = min(len(pool) - counts[_content(doc)] for doc in docs)
  if num_fewshot > fewest:
    raise ConfigError(f"--num_fewshot={num_fewshot}: task '{task.name}' has {fewest} few-shot examples to draw "
                      "from (its pool, less the evaluated document)")


def sample_fewshot(pool: list[Doc], doc: Doc, num_fewshot: int, *, seed: int, task: str) -> list[Doc]:
  """`num_fewshot` distinct pool documents other than `doc`, in a random order fixed by (seed, task, doc.id)."""
  candidates = [d for d in pool if _content(d) != _content(doc)]
  if num_fewshot > len(candidates):
    raise ConfigError(f"--num_fewshot={num_fewshot}: task '{task}' has {len(candidates)} few-shot examples for "
                      f"document '{doc.id}'")
  return random.Random(f"{seed}/{task}/{doc.id}").sample(candidates, num_fewshot)


def build_context(task: Task, doc: Doc, shots: list[Doc]) -> str:
  """description + each example's prompt, target delimiter and answer, joined by the few-shot delimiter, then
  the document's prompt."""
  solved = [task.prompt(shot) + task.target_delimiter + task.target(shot) for shot in shots]
  return task.description + task.fewshot_delimiter.join(solved + [task.prompt(doc)])
