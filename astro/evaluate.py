"""Scores of a policy on held-out problems (Kim et al. 2025, section 3): pass@1 as the mean correctness of
`n` temperature samples per problem, maj@k (the majority answer of the first k samples, answers grouped by
equivalence), pass@1 by difficulty, and the search behaviour the paper tracks: backtracks per solution and
their correlation with correctness (Pearson over samples; the paper finds more backtracking goes with higher
accuracy across checkpoints)."""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from common.eval.sampling import majority_vote, pass_at_k
from common.generate import generate
from common.tokenizers import Tokenizer

from astro import data as astro_data
from astro.linearize import count_backtracks

CHUNK_ROWS = 256  # rows per generation call


def sample_solutions(model, tokenizer: Tokenizer, problems: Sequence[astro_data.Problem], *, n: int,
                     temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
  """`n` completions of each problem's prompt, in batches of CHUNK_ROWS rows (each chunk its own seed)."""
  bos = tokenizer.bos_id is not None
  rows = [tokenizer.encode(astro_data.prompt_of(p), bos=bos) for p in problems for _ in range(n)]
  texts = []
  for c, start in enumerate(range(0, len(rows), CHUNK_ROWS)):
    chunk = rows[start:start + CHUNK_ROWS]
    chunk = chunk + [chunk[0]] * (min(CHUNK_ROWS, len(rows)) - len(chunk))  # one compiled shape
    out = generate(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                   stop_ids=tokenizer.stop_ids, tokenizer=tokenizer, seed=seed * 7919 + c)
    texts += [tokenizer.decode(ids) for ids in out]
  return [texts[i * n:(i + 1) * n] for i in range(len(problems))]


def correlation(x: Sequence[float], y: Sequence[float]) -> float:
  """Pearson's r; NaN when either side is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 2 or x.std() == 0 or y.std() == 0:
    return math.nan
  return float(np.corrcoef(x, y)[0, 1])


def score(problems: Sequence[astro_data.Problem], samples: Sequence[Sequence[str]], *, k: int,
          backtrack: re.Pattern) -> dict:
  """The metrics (percentages) of `samples[i]`, the completions of `problems[i]`."""
  correct = [[astro_data.verify(p, s) for s in group] for p, group in zip(problems, samples)]
  backtracks = [[count_backtracks(s, backtrack) for s in group] for group in samples]
  majority = []
  for p, group in zip(problems, samples):
    answers = [astro_data.final_answer(s) for s in group[:k]]
    winner = majority_vote(answers, same=astro_data.same_answer)
    majority.append(winner is not None and astro_data.same_answer(p.answer, answers[winner]))
  flat_correct = [c for group in correct for c in group]
  flat_backtracks = [b for group in backtracks for b in group]
  by_difficulty = {}
  for level in sorted({p.difficulty for p in problems}):
    chosen = [np.mean(c) for p, c in zip(problems, correct) if p.difficulty == level]
    by_difficulty[str(level)] = 100 * float(np.mean(chosen))
  n = len(samples[0])
  with_bt = [c for c, b in zip(flat_correct, flat_backtracks) if b > 0]
  return {
      "pass@1": 100 * float(np.mean(flat_correct)),
      f"maj@{k}": 100 * float(np.mean(majority)),
      f"pass@{k}": 100 * float(np.mean([pass_at_k(n, sum(c), k) for c in correct])),
      "by_difficulty": by_difficulty,
      "backtracks": float(np.mean(flat_backtracks)),
      "backtrack_share": 100 * float(np.mean([b > 0 for b in flat_backtracks])),
      "accuracy_with_backtracks": 100 * float(np.mean(with_bt)) if with_bt else math.nan,
      "backtrack_correlation": correlation(flat_backtracks, flat_correct),
      "length": float(np.mean([len(s) for group in samples for s in group])),
  }


def evaluate_policy(model, tokenizer: Tokenizer, problems: Sequence[astro_data.Problem], *, n: int, k: int,
                    temperature: float, max_new_tokens: int, seed: int, backtrack: re.Pattern) -> dict:
  if not 1 <= k <= n:
    raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
  samples = sample_solutions(model, tokenizer, problems, n=n, temperature=temperature,
                             max_new_tokens=max_new_tokens, seed=seed)
  result = score(problems, samples, k=k, backtrack=backtrack)
  result["example"] = astro_data.prompt_of(problems[0]) + samples[0][0]
  return result
