"""A dense LM and its tokenizer as the evaluation harness asks them: log-likelihoods of (context, continuation)
texts, rolling log-likelihoods of documents, greedy generations until stop strings.

Texts become ids here, by the boundary rule of `common.eval.requests`; scoring goes through
`common.scoring.score_continuations` and generation through `common.generate.generate`, which batch and pad.
A context that does not fit the model's window (`max_length`: the model's `max_len`, else `DEFAULT_WINDOW`)
loses its oldest ids, as a reader with that window would. `rows_computed` counts the rows sent to the model,
so a test can tell what a resumed run recomputed.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx
from jax.sharding import Mesh

from common.config import ConfigError
from common.eval.requests import encode_pair, rolling_windows, truncate_context
from common.generate import generate, model_limits, stop_string_cut
from common.scoring import score_continuations
from common.tokenizers import Tokenizer

DEFAULT_WINDOW = 2048  # tokens, for a model without a context length (model.max_len = 0)


class LanguageModel:

  def __init__(self, model: nnx.Module, tokenizer: Tokenizer, *, batch_size: int = 16, max_length: int = 0,
               rolling_stride: int = 0, seed: int = 0, mesh: Mesh | None = None):
    self.model, self.tokenizer, self.batch_size, self.seed, self.mesh = model, tokenizer, batch_size, seed, mesh
    self.max_length = max_length or model_limits(model)[1] or DEFAULT_WINDOW
    self.rolling_stride = rolling_stride or self.max_length
    if not 1 <= self.rolling_stride <= self.max_length:
      raise ConfigError(f"--rolling_stride={rolling_stride}: must be between 1 and the window of {self.max_length} "
                        "tokens (--max_length)")
    # Every row opens with BOS where the tokenizer has one; a context-free text (a rolling window, an empty
    # context) opens with BOS or, for tokenizers without one (bytes), the end-of-text id.
    self.prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    self.start_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    self.rows_computed = 0

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The ids scored for one (context, continuation): the context cut to the window, never empty."""
    context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation, self.prefix)
    return truncate_context(context_ids or [self.start_id], continuation_ids, self.max_length), continuation_ids

  def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list:
    self.rows_computed += len(pairs)
    return score_continuations(self.model, [c for c, _ in pairs], [x for _, x in pairs], batch_size=self.batch_size,
                               vocab_size=self.tokenizer.vocab_size, mesh=self.mesh)

  def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether the continuation is the greedy one) of each text pair."""
    scored = self._score([self.encode_pair(context, continuation) for context, continuation in requests])
    return [(s.logprob, s.is_greedy) for s in scored]

  def rolling_loglikelihood(self, texts: Sequence[str]) -> list[float]:
    """log p(text) of each text, token by token in windows of `max_length` advancing by `rolling_stride`
    (default: the window, disjoint windows), the first conditioned on the start id."""
    windows, owner = [], []
    for i, text in enumerate(texts):
      for window in rolling_windows(self.tokenizer.encode(text), self.start_id, self.max_length,
                                    self.rolling_stride):
        windows.append(window)
        owner.append(i)
    totals = [0.0] * len(texts)
    for i, scored in zip(owner, self._score(windows)):
      totals[i] += scored.logprob
    return totals

  def generate_until(self, prompts: Sequence[str], until: Sequence[str], max_new_tokens: int) -> list[str]:
    """The greedy continuation of each prompt, cut before the first stop string (or the tokenizer's stop id)."""
    if max_new_tokens >= self.max_length:
      raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the window of "
                       f"{self.max_length} tokens")
    keep = self.max_length - max_new_tokens
    ids = [(self.prefix + self.tokenizer.encode(p))[-keep:] for p in prompts]
    self.rows_computed += len(ids)
    rows = generate(self.model, ids, max_new_tokens=max_new_tokens, stop_ids=self.tokenizer.stop_ids,
                    stop_strings=tuple(until), tokenizer=self.tokenizer, seed=self.seed, mesh=self.mesh)
    texts = [self.tokenizer.decode(row) for row in rows]
    return [text[:stop_string_cut(text, until)] for text in texts]
