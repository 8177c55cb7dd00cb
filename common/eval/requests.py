"""What a model is asked, in token ids: (context, continuation) pairs cut at a text boundary, and the windows
that cover a long document for its rolling log-likelihood. Pure functions of ids and a tokenizer.

The boundary: a prompt such as 'Answer:' is followed by ' 12', and a tokenizer that glues a space to the
word after it (BPE, SentencePiece) writes ' 12' as one token. If the context ends in the space instead
('Answer: ' + '12'), the space is moved to the continuation first; then the concatenation is tokenised once,
and the continuation's tokens are those after the context's own tokens, so the scored tokens are the ones the
model would read in running text, not the ids of two texts tokenised apart.
"""
from __future__ import annotations

from typing import Sequence

from common.tokenizers import Tokenizer


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
  """(context, continuation) with the context's trailing whitespace moved to the start of the continuation."""
  kept = context.rstrip()
  return kept, context[len(kept):] + continuation


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, prefix: Sequence[int]
                ) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids): `prefix` (BOS, or the start id a context-free text needs) + the ids of
  the context's text within the tokenised concatenation, and the ids after them."""
  context, continuation = move_trailing_space(context, continuation)
  whole = tokenizer.encode(context + continuation)
  context_len = len(tokenizer.encode(context)) if context else 0
  return list(prefix) + whole[:context_len], whole[context_len:]


def truncate_context(context: Sequence[int], continuation: Sequence[int], max_len: int) -> list[int]:
  """The context's last ids such that context + continuation, less its last id (the model's input), fits
  `max_len` (0: unbounded). The continuation is never cut."""
  if not max_len:
    return list(context)
  if len(continuation) > max_len:
    raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the context of {max_len}")
  return list(context)[max(0, len(context) + len(continuation) - 1 - max_len):]


def rolling_windows(ids: Sequence[int], prefix: int, max_len: int, stride: int
                    ) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) pairs whose continuations cover `ids` once, in order. The first scores the first
  `max_len` ids after `prefix`; each later one scores the next `stride` ids after as many preceding ids as fit
  the model's input of `max_len` (stride = max_len: disjoint windows, each seeing one id of the last; stride 1:
  every id sees the max_len ids before it)."""
  if not 1 <= stride <= max_len:
    raise ValueError(f"stride {stride} must be between 1 and the window of {max_len} tokens")
  ids = list(ids)
  windows = [([prefix], ids[:max_len])] if ids else []
  for start in range(max_len, len(ids), stride):
    end = min(start + stride, len(ids))
    windows.append((ids[end - 1 - max_len:start], ids[start:end]))
  return windows
