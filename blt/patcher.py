"""Patching: segmenting a byte stream into patches (Pagnoni et al. 2024, Sec. 2).

Every patcher returns per-byte `patch_starts` (bool [batch, length], True where a patch begins; position 0
always begins one), `patch_ids` (int32 [batch, length], the patch index of each byte, 0-based) and
`bytes_per_patch` (int32 [batch, max_patches]; 0 for patch slots past the last patch). All functions but
`bpe_starts` are pure jnp, batched and jit-able with `max_patches`, `patch_size` and `max_patch_length` static.

Rules (a byte at position t+1 opens a patch when ...):
- `static` (Sec. 2.1): t+1 is a multiple of `patch_size` (given segment ids and positions: the position of
  t+1 in its segment is).
- `space` (Sec. 2.2, after Slagle 2024's SpaceByte): byte t is space-like and byte t+1 is not. Space-like
  bytes are the ASCII bytes that are neither letters nor digits (0x00-0x7F minus [0-9A-Za-z]): space, tab,
  newline, the other control bytes and ASCII punctuation. A run of space-like bytes (", " or ".\\n\\n") thus
  stays with the word before it, and the next word opens a patch. Bytes >= 0x80 (UTF-8 multi-byte
  characters) and special ids >= 256 are not space-like.
- `entropy`, global constraint (Sec. 2.3): H(t) > theta.
- `entropy`, approximate monotonic constraint (Sec. 2.3): H(t) - H(t-1) > theta, for t >= 1 (position 1
  never opens a patch by this rule, since H(-1) is undefined).
- `bpe` (the paper's BPE-patching baseline, Sec. 2.4): byte t+1 begins a SentencePiece token of the text.
  Computed on the host (`bpe_starts`, numpy + sentencepiece) and passed in as `patch_starts`. Unlike the
  rules above it looks ahead: whether a token boundary falls at t+1 can depend on bytes after t+1 (the
  tokenizer sees the whole word), so a BLT patched this way is not strictly causal at patch boundaries.

Documents packed into one row never share a patch: given `segment_ids` (and `positions`), `patch` also opens
a patch wherever a segment begins (positions == 0 inside a segment, or the segment id changes, which
includes the start of row padding).

Here H(t) = `entropies[:, t]` is the entropy of the entropy model's prediction *of byte t+1* made at
position t (see `blt.entropy`); in the paper's notation H(t) is H(x_{t+1}), so "x_{t+1} opens a patch when
the model is uncertain about it". Every rule decides patch_starts[t+1] from bytes <= t+1 only (entropy rules
from bytes <= t), which keeps a BLT causal.

`max_patch_length` (> 0) forces a new patch once the current one holds that many bytes; it is applied after
the rule, left to right, so a forced start resets the count (a `lax.scan` over the length).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# 256-entry lookup: is byte value v space-like? (ASCII non-alphanumerics, see module docstring).
_SPACE_LIKE = np.array([v < 128 and not chr(v).isalnum() for v in range(256)], bool)


METHODS = ("static", "space", "entropy", "entropy_monotonic", "bpe")


class Patches(NamedTuple):
  patch_starts: jax.Array     # bool [batch, length]
  patch_ids: jax.Array        # int32 [batch, length]
  bytes_per_patch: jax.Array  # int32 [batch, max_patches]
  num_patches: jax.Array      # int32 [batch]; may exceed max_patches (then the tail is not counted)


def is_space_like(byte_ids: jax.Array) -> jax.Array:
  """bool, same shape: ASCII non-alphanumeric bytes; False for bytes >= 128 and special ids >= 256."""
  table = jnp.asarray(np.concatenate([_SPACE_LIKE, [False]]))
  return table[jnp.clip(byte_ids, 0, 256)]


def enforce_max_length(patch_starts: jax.Array, max_patch_length: int) -> jax.Array:
  """Adds a start wherever the running patch would exceed `max_patch_length` bytes (0: no limit)."""
  patch_starts = patch_starts.at[:, 0].set(True)
  if max_patch_length <= 0:
    return patch_starts

  def step(run, start):  # run: bytes in the current patch before this one, [batch]
    start = start | (run >= max_patch_length)
    run = jnp.where(start, 1, run + 1)
    return run, start

  run0 = jnp.zeros(patch_starts.shape[0], jnp.int32)
  _, starts = jax.lax.scan(step, run0, patch_starts.T)
  return starts.T


def patches_from_starts(patch_starts: jax.Array, max_patches: int, max_patch_length: int = 0) -> Patches:
  """Patch ids and sizes from boolean starts [batch, length] (position 0 is always a start)."""
  starts = enforce_max_length(patch_starts.astype(bool), max_patch_length)
  patch_ids = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1
  batch = jnp.arange(starts.shape[0])[:, None]
  bytes_per_patch = jnp.zeros((starts.shape[0], max_patches), jnp.int32).at[batch, patch_ids].add(
      1, mode="drop")
  return Patches(starts, patch_ids, bytes_per_patch, patch_ids[:, -1] + 1)


def static_starts(shape: tuple[int, int], patch_size: int, segment_ids: jax.Array | None = None,
                  positions: jax.Array | None = None) -> jax.Array:
  """Fixed-size patches (Sec. 2.1): a start every `patch_size` bytes of the row, or, given packed
  `segment_ids` and `positions`, of each segment (the row padding, segment 0, opens none)."""
  if segment_ids is None or positions is None:
    return jnp.broadcast_to(jnp.arange(shape[1]) % patch_size == 0, shape)
  return (positions % patch_size == 0) & (segment_ids > 0)


def space_starts(byte_ids: jax.Array) -> jax.Array:
  """Space patching (Sec. 2.2): start at t+1 when byte t is space-like and byte t+1 is not."""
  space = is_space_like(byte_ids)
  after_space = space[:, :-1] & ~space[:, 1:]
  return jnp.concatenate([jnp.ones_like(space[:, :1]), after_space], axis=1)


def entropy_starts(entropies: jax.Array, threshold: float, monotonic: bool = False) -> jax.Array:
  """Entropy patching (Sec. 2.3): start at t+1 when H(t) > threshold (global), or when
  H(t) - H(t-1) > threshold (monotonic). `entropies` [batch, length]: H(t) predicts byte t+1."""
  starts = jnp.zeros(entropies.shape, bool).at[:, 0].set(True)
  if monotonic:
    return starts.at[:, 2:].set(entropies[:, 1:-1] - entropies[:, :-2] > threshold)
  return starts.at[:, 1:].set(entropies[:, :-1] > threshold)


def segment_starts(segment_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
  """bool [batch, length]: where a packed segment begins (position 0 of a non-padding segment, or a change
  of segment id, which also separates a document from the row padding after it)."""
  changed = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                            axis=1)
  if positions is None:
    return changed
  return changed | ((positions == 0) & (segment_ids > 0))


def patch(byte_ids: jax.Array, *, method: str, max_patches: int, patch_size: int = 4,
          entropies: jax.Array | None = None, threshold: float = 0.0, max_patch_length: int = 0,
          patch_starts: jax.Array | None = None, segment_ids: jax.Array | None = None,
          positions: jax.Array | None = None) -> Patches:
  """One entry point: `method` in {'static', 'space', 'entropy', 'entropy_monotonic', 'bpe'}; 'bpe' takes
  the host-computed `patch_starts`. With `segment_ids`, every segment start also opens a patch."""
  if method == "static":
    starts = static_starts(byte_ids.shape, patch_size, segment_ids, positions)
  elif method == "space":
    starts = space_starts(byte_ids)
  elif method in ("entropy", "entropy_monotonic"):
    if entropies is None:
      raise ValueError(f"patching method '{method}' needs entropies")
    starts = entropy_starts(entropies, threshold, monotonic=method == "entropy_monotonic")
  elif method == "bpe":
    if patch_starts is None:
      raise ValueError("patching method 'bpe' needs patch_starts (from bpe_starts)")
    starts = patch_starts.astype(bool)
  else:
    raise ValueError(f"unknown patching method '{method}' (known: {', '.join(METHODS)})")
  if segment_ids is not None:
    starts = starts | segment_starts(segment_ids, positions)
  return patches_from_starts(starts, max_patches, max_patch_length)


def bpe_starts(byte_ids: np.ndarray, segment_ids: np.ndarray, sentencepiece_processor) -> np.ndarray:
  """BPE patching on the host: bool [batch, length], True where a SentencePiece token of the segment's text
  begins (and at every segment start). Special ids (BOS, EOS) are single-byte patches; the row padding
  (segment 0) is one patch. Bytes that are not valid UTF-8 (a document cut mid-character by packing) each
  start a patch; the valid runs between them are tokenized separately. Token boundaries look ahead (module
  docstring)."""
  byte_ids, segment_ids = np.asarray(byte_ids), np.asarray(segment_ids)
  special = (byte_ids >= 256) & (segment_ids > 0)  # BOS/EOS; the row padding is one patch
  starts = np.ones(byte_ids.shape, bool)  # structural starts: segments, and special ids alone in a patch
  starts[:, 1:] = (segment_ids[:, 1:] != segment_ids[:, :-1]) | special[:, 1:] | special[:, :-1]
  out = starts.copy()
  for row in range(byte_ids.shape[0]):
    edges = [*np.flatnonzero(starts[row]), byte_ids.shape[1]]
    for begin, end in zip(edges[:-1], edges[1:]):  # one special id, or a run of bytes of one segment
      if byte_ids[row, begin] >= 256:
        continue
      for offset in _token_offsets(bytes(byte_ids[row, begin:end].astype(np.uint8)), sentencepiece_processor):
        out[row, begin + offset] = True
  return out


def _token_offsets(data: bytes, sentencepiece_processor) -> list[int]:
  """Byte offsets in `data` where SentencePiece tokens begin (invalid UTF-8 bytes: one token each)."""
  text = data.decode("utf-8", errors="surrogateescape")  # an invalid byte b -> the lone surrogate U+DC00 + b
  offsets, position, run = [], 0, ""
  for char in [*text, None]:  # None flushes the last run
    if char is not None and not 0xDC80 <= ord(char) <= 0xDCFF:
      run += char
      continue
    if run:
      proto = sentencepiece_processor.encode(run, out_type="proto")
      offsets.extend(position + piece.begin for piece in proto.pieces)
      position += len(run.encode("utf-8"))
      run = ""
    if char is not None:
      offsets.append(position)
      position += 1
  return offsets
