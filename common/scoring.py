"""Log-likelihood scoring with the dense LM: continuations given prompts, perplexity, multiple choice, and
LM-based similarity of texts (embeddings, cosine matrix, likelihood relevance).

The log-probability of a continuation c given a prompt x is sum_t log p(c_t | x, c_<t), read off one
forward pass over x + c (teacher forcing), as in the multiple-choice evaluations of GPT-3 (Brown et al.
2020, Sec. 2.4), which also compare options by their length-normalised log-likelihood. Examples are sorted
by length and batched with right padding (width a multiple of `WIDTH_BUCKET`); padding tokens carry
segment id 0, so the real tokens never attend to them and their scores do not depend on the batch. Ids
outside the model's vocabulary and rows longer than its context (`model.max_len`) are refused, as in
`common.generate`.

Similarity: a text's embedding is the mean of the model's final hidden states over its tokens (padding
masked out), compared by cosine, as sentence embeddings from mean-pooled states (Reimers & Gurevych 2019,
Sec. 3), for the maximal-marginal-relevance exemplar selection of Ye et al. (2023); relevance of a text b
to a context a is the mean per-token log p(b | a) - log p(b), the pointwise mutual information of the two
texts under the model.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from common.generate import (StaticGraph, check_context, check_token_ids, model_limits, padded_batch, put_batch,
                             split_for_jit, under_mesh)
from common.models.hf_llama import mask_padded_vocab

WIDTH_BUCKET = 32


class Scored(NamedTuple):
  logprob: float               # sum of the continuation's token log-probabilities
  token_logprobs: np.ndarray   # f32 [len(continuation)]: log p(c_t | prompt, c_<t)
  is_greedy: bool              # every continuation token is the model's argmax at its position


@functools.partial(jax.jit, static_argnums=(0, 1))
def _target_logprobs(graph: StaticGraph, vocab_size: int, state: nnx.State, inputs: jax.Array,
                     targets: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """log p(targets[:, t] | inputs[:, :t+1]) f32 [batch, width] and whether each target is the argmax."""
  model = nnx.merge(graph.graphdef, state)
  logits = model(inputs, None, segment_ids)  # [batch, width, vocab]
  if vocab_size:
    logits = mask_padded_vocab(logits, vocab_size)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  return picked, jnp.argmax(logits, axis=-1) == targets


def score_continuations(model: nnx.Module, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], *, batch_size: int = 16, vocab_size: int = 0,
                        mesh: Mesh | None = None) -> list[Scored]:
  """The log-likelihood of each continuation (ids) given its prompt (ids, at least one: e.g. BOS), per
  example. `vocab_size` > 0 leaves the model's padded ids out of the softmax (`mask_padded_vocab`)."""
  if len(prompts) != len(continuations):
    raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
  empty = [i for i, p in enumerate(prompts) if not len(p)]
  if empty:
    raise ValueError(f"prompts {empty[:5]} are empty: the first token needs a context (e.g. BOS)")
  rows = [list(p) + list(c) for p, c in zip(prompts, continuations)]
  model_vocab, max_len = model_limits(model)
  if vocab_size and model_vocab and vocab_size > model_vocab:
    raise ValueError(f"vocab_size {vocab_size} (the tokenizer's) exceeds the model's vocabulary of {model_vocab}")
  check_token_ids(rows, model_vocab, "example")
  check_context([len(row) - 1 for row in rows], max_len, "input (prompt + continuation but its last token) of example")
  graph, state = split_for_jit(model, mesh)
  order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
  results: list[Scored | None] = [None] * len(rows)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    batch = padded_batch(len(chunk), mesh)
    width = -(-max(len(rows[i]) - 1 for i in chunk) // WIDTH_BUCKET) * WIDTH_BUCKET
    inputs, targets = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
    segment_ids = np.zeros((batch, width), np.int32)
    for r, i in enumerate(chunk):
      n = len(rows[i]) - 1
      inputs[r, :n], targets[r, :n], segment_ids[r, :n] = rows[i][:-1], rows[i][1:], 1
    with under_mesh(mesh):
      logprobs, greedy = _target_logprobs(graph, int(vocab_size), state, *(
          put_batch(a, mesh) for a in (inputs, targets, segment_ids)))
    logprobs, greedy = np.asarray(jax.device_get(logprobs)), np.asarray(jax.device_get(greedy))
    for r, i in enumerate(chunk):
      n, k = len(rows[i]) - 1, len(continuations[i])
      token_logprobs = logprobs[r, n - k:n]
      results[i] = Scored(float(token_logprobs.sum(dtype=np.float64)), token_logprobs,
                          bool(greedy[r, n - k:n].all()))
  return results


def perplexity(model: nnx.Module, token_rows: Sequence[Sequence[int]], *, batch_size: int = 16,
               vocab_size: int = 0, mesh: Mesh | None = None) -> float:
  """exp of the mean negative log-likelihood of every token but each row's first (which has no context)."""
  scored = score_continuations(model, [row[:1] for row in token_rows], [row[1:] for row in token_rows],
                               batch_size=batch_size, vocab_size=vocab_size, mesh=mesh)
  count = sum(len(row) - 1 for row in token_rows)
  if count == 0:
    raise ValueError("perplexity needs at least one row of two or more tokens")
  return math.exp(-sum(s.logprob for s in scored) / count)


def choose(model: nnx.Module, prompt: Sequence[int], options: Sequence[Sequence[int]], *,
           length_normalize: bool = False, vocab_size: int = 0, mesh: Mesh | None = None) -> int:
  """Index of the option (ids) the model finds most likely after the prompt: by summed log-likelihood, or
  with `length_normalize` by its mean per token, which does not favour short options."""
  if not options or any(not len(o) for o in options):
    raise ValueError("choose needs at least one option, each of one token or more")
  scored = score_continuations(model, [prompt] * len(options), options, batch_size=len(options),
                               vocab_size=vocab_size, mesh=mesh)
  values = [s.logprob / len(o) if length_normalize else s.logprob for s, o in zip(scored, options)]
  return int(np.argmax(values))


@functools.partial(jax.jit, static_argnums=0)
def _mean_hidden(graph: StaticGraph, state: nnx.State, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Mean final hidden state over each row's real tokens, f32 [batch, d_model]."""
  model = nnx.merge(graph.graphdef, state)
  hidden = model.hidden(tokens, None, segment_ids).astype(jnp.float32)  # [batch, width, d_model]
  real = (segment_ids > 0).astype(jnp.float32)[..., None]
  return jnp.sum(hidden * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1.0)


def embed_texts(model: nnx.Module, token_rows: Sequence[Sequence[int]], *, batch_size: int = 16,
                mesh: Mesh | None = None) -> np.ndarray:
  """f32 [len(token_rows), d_model]: each row's mask-aware mean-pooled final hidden states (`DenseLM.hidden`),
  independent of its batch mates and of the padding."""
  if any(not len(row) for row in token_rows):
    raise ValueError("embed_texts needs at least one token in every row")
  vocab_size, max_len = model_limits(model)
  check_token_ids(token_rows, vocab_size, "row")
  check_context([len(row) for row in token_rows], max_len, "row")
  graph, state = split_for_jit(model, mesh)
  order = sorted(range(len(token_rows)), key=lambda i: len(token_rows[i]))
  out = np.zeros((len(token_rows), model.cfg.d_model), np.float32)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    batch = padded_batch(len(chunk), mesh)
    width = -(-max(len(token_rows[i]) for i in chunk) // WIDTH_BUCKET) * WIDTH_BUCKET
    tokens, segment_ids = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
    for r, i in enumerate(chunk):
      tokens[r, :len(token_rows[i])], segment_ids[r, :len(token_rows[i])] = token_rows[i], 1
    with under_mesh(mesh):
      pooled = _mean_hidden(graph, state, put_batch(tokens, mesh), put_batch(segment_ids, mesh))
    out[chunk] = np.asarray(jax.device_get(pooled))[:len(chunk)]
  return out


@jax.jit
def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """[n, m] cosine similarities of the rows of a [n, d] and b [m, d] (a zero row is similar to nothing)."""
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return unit(a.astype(jnp.float32)) @ unit(b.astype(jnp.float32)).T


def similarity_matrix(model: nnx.Module, rows_a: Sequence[Sequence[int]], rows_b: Sequence[Sequence[int]] | None = None,
                      *, batch_size: int = 16, mesh: Mesh | None = None) -> np.ndarray:
  """f32 [len(rows_a), len(rows_b)] cosine similarity of the texts' embeddings (`embed_texts`); rows_b None:
  rows_a against itself."""
  a = embed_texts(model, rows_a, batch_size=batch_size, mesh=mesh)
  b = a if rows_b is None else embed_texts(model, rows_b, batch_size=batch_size, mesh=mesh)
  return np.asarray(cosine_similarity(a, b))


def likelihood_relevance(model: nnx.Module, contexts: Sequence[Sequence[int]], texts: Sequence[Sequence[int]], *,
                         start: Sequence[int], batch_size: int = 16, vocab_size: int = 0,
                         mesh: Mesh | None = None) -> np.ndarray:
  """f64 [len(texts)]: mean over text i's tokens of log p(t | start + context i) - log p(t | start), how much
  the context makes the text more likely. `start` (e.g. BOS, or the document-start id a model was trained
  with) opens both rows, so the unconditional score has a context too."""
  if len(contexts) != len(texts):
    raise ValueError(f"{len(contexts)} contexts but {len(texts)} texts")
  if not len(start):
    raise ValueError("start needs at least one id (e.g. BOS): the first text token needs a context")
  prompts = [list(start) + list(c) for c in contexts] + [list(start)] * len(texts)
  scored = score_continuations(model, prompts, list(texts) * 2, batch_size=batch_size, vocab_size=vocab_size,
                               mesh=mesh)
  n = len(texts)
  return np.array([(scored[i].logprob - scored[n + i].logprob) / len(texts[i]) for i in range(n)])
