"""Metrics of the evaluation tasks (`common.eval.tasks`) per document, and their aggregates over a task.

A per-document metric is reported as its mean with the standard error of that mean, the sample standard
deviation (n - 1 in the denominator) over sqrt(n), as the EleutherAI harness reports it. Multiple choice:
`acc` picks the choice of the highest log-likelihood, `acc_norm` the highest log-likelihood per character of
the choice (the harness's length normalisation; GPT-3, Brown et al., 2020, Sec. 2.4, normalises per token).
Rolling log-likelihood is a corpus metric: total log-likelihood over total words (whitespace-separated) or
UTF-8 bytes, as perplexity, and bits per byte = -total / bytes / ln 2, tokenizer-independent; it has no
per-document standard error.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from common.eval import math_answers


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, sample std / sqrt(n)); the standard error is None for fewer than two values."""
  if not values:
    raise ValueError("mean_stderr needs at least one value")
  n = len(values)
  mean = math.fsum(values) / n
  if n < 2:
    return mean, None
  variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(variance / n)


def answer_score(metric: str, answer: str | None, reference: str) -> float:
  """1.0 when the filtered answer equals the reference: as text (`exact_match`) or as mathematics
  (`math_equal`); an answer the filter did not find (None) is wrong."""
  if answer is None:
    return 0.0
  if metric == "exact_match":
    return float(answer.strip() == reference.strip())
  if metric == "math_equal":
    return float(math_answers.math_equivalent(reference, answer))
  raise ValueError(f"unknown answer metric '{metric}'")


def choice_metrics(logliks: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
  """acc and acc_norm of one multiple-choice document from each choice's log-likelihood."""
  best = max(range(len(logliks)), key=lambda i: logliks[i])
  best_norm = max(range(len(logliks)), key=lambda i: logliks[i] / max(len(choices[i]), 1))
  return {"acc": float(best == gold), "acc_norm": float(best_norm == gold)}


def word_count(text: str) -> int:
  return len(re.split(r"\s+", text.strip())) if text.strip() else 0


def rolling_metrics(logliks: Sequence[float], texts: Sequence[str]) -> dict[str, float]:
  """word_perplexity, byte_perplexity and bits_per_byte of documents with total log-likelihoods `logliks`."""
  total = math.fsum(logliks)
  words = sum(word_count(t) for t in texts)
  num_bytes = sum(len(t.encode("utf-8")) for t in texts)
  return {"word_perplexity": math.exp(-total / max(words, 1)),
          "byte_perplexity": math.exp(-total / num_bytes),
          "bits_per_byte": -total / num_bytes / math.log(2)}
