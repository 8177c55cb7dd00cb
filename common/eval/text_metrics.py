"""Text-answer metrics: exact match and token F1 with SQuAD normalisation, and ROUGE-L.

Exact match and F1 follow the SQuAD evaluation script (Rajpurkar et al., 2016, section 4; v2.0 for empty
answers): both strings are lowercased, stripped of punctuation and of the articles a/an/the, and split on
whitespace; a prediction is scored against every reference and the best score counts. ROUGE-L (Lin, 2004,
section 3) is the F-measure of the longest common subsequence of tokens, computed by the `rouge-score`
package so that numbers match the published summarisation evaluations.
"""
from __future__ import annotations

import collections
import functools
import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _as_references(references: str | Sequence[str]) -> list[str]:
  refs = [references] if isinstance(references, str) else list(references)
  if not refs:
    raise ValueError("references: need at least one reference answer")
  return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
  """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(ref) for ref in _as_references(references)))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
  if not pred_tokens or not ref_tokens:  # SQuAD v2.0: an empty answer is right only against an empty one
    return float(pred_tokens == ref_tokens)
  common = sum((collections.Counter(pred_tokens) & collections.Counter(ref_tokens)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred_tokens), common / len(ref_tokens)
  return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
  """Bag-of-tokens F1 between normalised prediction and reference, maximised over references."""
  pred_tokens = normalize_answer(prediction).split()
  return max(_f1(pred_tokens, normalize_answer(ref).split()) for ref in _as_references(references))


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(prediction: str, references: str | Sequence[str], *, use_stemmer: bool = False) -> float:
  """ROUGE-L F-measure (sentence-level LCS, rouge-score's tokeniser), maximised over references."""
  scorer = _rouge_scorer(use_stemmer)
  return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in _as_references(references))
