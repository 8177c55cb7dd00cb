"""The four similarities S(q, q_j) that exemplar selection ranks by (Ye et al. 2023, sec. 5.2): the LM's
mean-pooled embedding cosine, BM25, the symmetrised LM likelihood, and a BERTScore-style token matcher.

Each returns a [len(a), len(b)] matrix of question-to-question similarity; MMR needs both the query-to-pool
row and the pool-to-pool matrix, so every score is defined for any pair of texts.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.config import ConfigError
from common.generate import StaticGraph, split_for_jit
from common.scoring import WIDTH_BUCKET, cosine_similarity, likelihood_relevance, similarity_matrix
from common.tokenizers import Tokenizer

SIMILARITIES = ("embedding", "bm25", "likelihood", "token_match")
BM25_K1, BM25_B = 1.5, 0.75
_TERM = re.compile(r"\w+|[^\w\s]")


def terms(text: str) -> list[str]:
  """Lower-cased words and single punctuation marks (a glyph such as '#' is a term of its own)."""
  return _TERM.findall(text.lower())


def bm25(queries: Sequence[str], documents: Sequence[str], *, k1: float = BM25_K1, b: float = BM25_B) -> np.ndarray:
  """Okapi BM25 of each document for each query, statistics over `documents`:
  sum over query terms t of idf(t) * f(t,d) (k1 + 1) / (f(t,d) + k1 (1 - b + b |d| / avgdl)),
  idf(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5)) (the non-negative idf of Lucene); a repeated query term
  counts once per occurrence."""
  docs = [terms(d) for d in documents]
  n_docs = len(docs)
  avgdl = sum(len(d) for d in docs) / max(n_docs, 1)
  doc_freq: dict[str, int] = {}
  for d in docs:
    for t in set(d):
      doc_freq[t] = doc_freq.get(t, 0) + 1
  out = np.zeros((len(queries), n_docs))
  for i, q in enumerate(queries):
    for j, d in enumerate(docs):
      counts: dict[str, int] = {}
      for t in d:
        counts[t] = counts.get(t, 0) + 1
      score = 0.0
      for t in terms(q):
        f = counts.get(t, 0)
        if f:
          idf = math.log(1 + (n_docs - doc_freq[t] + 0.5) / (doc_freq[t] + 0.5))
          score += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / max(avgdl, 1e-9)))
      out[i, j] = score
  return out


def greedy_match_f1(a: np.ndarray, b: np.ndarray) -> float:
  """BERTScore's F1 (Zhang et al. 2020, eq. 1-3, no idf weights) of token vectors a [n, d] and b [m, d]:
  recall = mean over a's tokens of the best cosine in b, precision the same from b to a."""
  sims = np.asarray(cosine_similarity(a, b))
  recall, precision = float(sims.max(axis=1).mean()), float(sims.max(axis=0).mean())
  return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


@functools.partial(jax.jit, static_argnums=0)
def _hidden(graph: StaticGraph, state: nnx.State, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
  return nnx.merge(graph.graphdef, state).hidden(tokens, None, segment_ids).astype(jnp.float32)


def token_states(model: nnx.Module, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
  """Each row's final hidden states (contextual token vectors), f32 [len(row), d_model]; padding (segment 0,
  width a multiple of WIDTH_BUCKET) is never attended to."""
  width = -(-max(len(r) for r in rows) // WIDTH_BUCKET) * WIDTH_BUCKET
  tokens, segment_ids = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], segment_ids[i, :len(r)] = r, 1
  graph, state = split_for_jit(model, None)
  hidden = np.asarray(jax.device_get(_hidden(graph, state, tokens, segment_ids)))
  return [hidden[i, :len(r)] for i, r in enumerate(rows)]


def similarity(kind: str, a: Sequence[str], b: Sequence[str], *, model: nnx.Module | None = None,
               tokenizer: Tokenizer | None = None) -> np.ndarray:
  """[len(a), len(b)] similarity `kind` (SIMILARITIES) of texts a to texts b; the LM ones need the model."""
  if kind not in SIMILARITIES:
    raise ConfigError(f"unknown similarity '{kind}' (valid: {', '.join(SIMILARITIES)})")
  if kind == "bm25":
    return bm25(a, b)
  if model is None or tokenizer is None:
    raise ValueError(f"similarity '{kind}' needs the model and its tokenizer")
  rows_a, rows_b = [tokenizer.encode(t) for t in a], [tokenizer.encode(t) for t in b]
  if kind == "embedding":
    return similarity_matrix(model, rows_a, rows_b).astype(np.float64)
  if kind == "token_match":
    states_a, states_b = token_states(model, rows_a), token_states(model, rows_b)
    return np.array([[greedy_match_f1(x, y) for y in states_b] for x in states_a])
  return symmetric_likelihood(model, tokenizer, rows_a, rows_b)


def symmetric_likelihood(model: nnx.Module, tokenizer: Tokenizer, rows_a: Sequence[Sequence[int]],
                         rows_b: Sequence[Sequence[int]]) -> np.ndarray:
  """S(a, b) = (r(a | b) + r(b | a)) / 2, r(x | y) the mean per-token log p(x | y) - log p(x)
  (`common.scoring.likelihood_relevance`), so that the score is symmetric and a question is not favoured for
  being short or likely on its own."""
  start = [tokenizer.bos_id] if tokenizer.bos_id is not None else tokenizer.encode("Q:")
  sep = tokenizer.encode("\n")
  pairs = [(i, j) for i in range(len(rows_a)) for j in range(len(rows_b))]
  a_given_b = likelihood_relevance(model, [list(rows_b[j]) + sep for i, j in pairs], [rows_a[i] for i, _ in pairs],
                                   start=start, batch_size=64, vocab_size=tokenizer.vocab_size)
  b_given_a = likelihood_relevance(model, [list(rows_a[i]) + sep for i, _ in pairs], [rows_b[j] for _, j in pairs],
                                   start=start, batch_size=64, vocab_size=tokenizer.vocab_size)
  return ((a_given_b + b_given_a) / 2).reshape(len(rows_a), len(rows_b))
