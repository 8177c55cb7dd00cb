"""The metrics of Hase et al. (2023), as the official code computes them (percentages):

- update success: the updated main inputs predicted as the desired label;
- paraphrase update success: the updated points' paraphrases predicted as the desired label;
- entailment accuracy: entailed statements predicted as the label the update entails;
- retain rate: other beliefs whose prediction the update left unchanged;
- delta accuracy: accuracy on the other beliefs after the update minus before;
- paraphrase consistency: of all pairs among a point's predictions (its paraphrases and the main input),
  the share that agree, pooled over points (`get_number_matching_pairs`);
- corrupted: other beliefs right before the update and wrong after it.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np


def _pct(hits: np.ndarray) -> float:
  hits = np.asarray(hits, dtype=bool)
  return float(100.0 * hits.mean()) if hits.size else float("nan")


def update_success(after_preds, desired) -> float:
  return _pct(np.asarray(after_preds) == np.asarray(desired))


def entailment_accuracy(preds, labels) -> float:
  return _pct(np.asarray(preds) == np.asarray(labels))


def retain_rate(before_preds, after_preds) -> float:
  return _pct(np.asarray(before_preds) == np.asarray(after_preds))


def delta_accuracy(before_preds, after_preds, labels) -> float:
  labels = np.asarray(labels)
  return _pct(np.asarray(after_preds) == labels) - _pct(np.asarray(before_preds) == labels)


def matching_pairs(groups: Sequence[Sequence[int]]) -> tuple[int, int]:
  """(agreeing pairs, all pairs) over the pairs within each group."""
  agree = total = 0
  for group in groups:
    for a, b in itertools.combinations(group, 2):
      total += 1
      agree += int(a == b)
  return agree, total


def paraphrase_consistency(groups: Sequence[Sequence[int]]) -> float:
  """Each group is one point's paraphrase predictions followed by its main input's prediction."""
  agree, total = matching_pairs(groups)
  return 100.0 * agree / total if total else float("nan")


def corrupted(before_preds, after_preds, labels) -> tuple[int, int]:
  """(beliefs right before and wrong after, beliefs right before)."""
  before, after, labels = (np.asarray(x) for x in (before_preds, after_preds, labels))
  right = before == labels
  return int(np.sum(right & (after != labels))), int(np.sum(right))
