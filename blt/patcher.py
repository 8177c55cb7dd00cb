"""Patching: segmenting a byte stream into patches (Pagnoni et al. 2024, Sec. 2).

Every patcher returns per-byte `patch_starts` (bool [batch, length], True where a patch begins; position 0
always begins one), `patch_ids` (int32 [batch, length], the patch index of each byte, 0-based),
`next_patch_ids` (int32 [batch, length], the patch of byte t+1, the byte after the row included, when
it continues byte t's document: what the BLT decoder groups by, `blt.model`) and `bytes_per_patch` (int32 [batch, max_patches]; 0 for patch slots past
the last patch). All functions but `bpe_starts` are pure jnp, batched and jit-able with `max_patches`,
`patch_size` and `max_patch_length` static.

Overflow: a row with more patches than its `max_patches` slots keeps every byte in a slot: the bytes past the
last slot join it (`patch_ids` and `next_patch_ids` are clipped to max_patches - 1; `num_patches` is the true
count, and the last slot holds num_patches - max_patches + 1 patches). It then holds bytes that come after
its first patch, and no byte reads it: a byte reads the slots below its `next_patch_ids` (or `patch_ids`),
both <= max_patches - 1, so the BLT stays causal, and the merged bytes are predicted from the earlier slots
and their own byte context.

Rules (a byte at position t+1 opens a patch when ...):
- `static` (Sec. 2.1): t+1 is a multiple of `patch_size` (given segment ids and positions: the position of
  t+1 in its segment is).
- `space` (Sec. 2.2, after Slagle 2024's SpaceByte, as the official patcher): byte t is space-like and byte
  t-1 is not, or byte t is a special id (BOS, EOS). Space-like bytes are the ASCII bytes that are neither
  letters nor digits (0x00-0x7F minus [0-9A-Za-z]: space, tab, newline, the other control bytes, ASCII
  punctuation) and the UTF-8 lead bytes 0xC0-0xFF; continuation bytes 0x80-0xBF and special ids >= 256 are
  not. The first space-like byte after a word closes its patch: "hello, world" is "hello," | " world".
- `entropy`, global constraint (Sec. 2.3): H(t) > theta.
- `entropy`, approximate monotonic constraint (Sec. 2.3): H(t) - H(t-1) > theta.
Under `space` and the entropy rules, positions 0 and 1 always open a patch (0, 1 and 2 under the monotonic
rule), as in the official patcher: BOS is a patch alone, and the first byte's prediction reads it.
- `bpe` (the paper's BPE-patching baseline, Sec. 2.4): byte t+1 begins a SentencePiece token of the text.
  Computed on the host (`bpe_starts`, numpy + sentencepiece) and passed in as `patch_starts`. Unlike the
  rules above it looks ahead: whether a token boundary falls at t+1 can depend on bytes after t+1 (the
  tokenizer sees the whole word), so a BLT patched this way is not strictly causal at patch boundaries.

Documents packed into one row never share a patch: given `segment_ids` (and `positions`), `patch` also opens
a patch wherever a segment begins (positions == 0 inside a segment, or the segment id changes, which
includes the start of row padding).

Here H(t) = `entropies[:, t]` is the entropy of the entropy model's prediction *of byte t+1* made at
position t (see `blt.entropy`); in the paper's notation H(t) is H(x_{t+1}), so "x_{t+1} opens a patch when
the model is uncertain about it". Every rule but `bpe` decides patch_starts[t+1] from bytes <= t, so
whether the *next* byte opens a patch is known at byte t: the decoder's grouping needs it (`next_patch_ids`;
for the last byte of a row the rule is applied to the byte after it), and a BLT stays causal.

`max_patch_length` (> 0) forces a new patch once the current one holds that many bytes; it is applied after
the rule, left to right, so a forced start resets the count (a `lax.scan` over the length).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# 256-entry lookup: is byte value v space-like? (ASCII non-alphanumerics and UTF-8 lead bytes, module docstring)
_SPACE_LIKE = np.array([(v < 128 and not chr(v).isalnum()) or v >= 0xC0 for v in range(256)], bool)


METHODS = ("static", "space", "entropy", "entropy_monotonic", "bpe")


class Patches(NamedTuple):
  patch_starts: jax.Array     # bool [batch, length]
  patch_ids: jax.Array        # int32 [batch, length]
  next_patch_ids: jax.Array   # int32 [batch, length]: the patch of byte t+1 if it continues t's document
  bytes_per_patch: jax.Array  # int32 [batch, max_patches]
  num_patches: jax.Array      # int32 [batch]; may exceed max_patches (the tail then shares the last slot)


def is_space_like(byte_ids: jax.Array) -> jax.Array:
  """bool, same shape: ASCII non-alphanumeric bytes and UTF-8 lead bytes (>= 0xC0); False for continuation
  bytes and special ids >= 256."""
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


def patches_from_starts(patch_starts: jax.Array, max_patches: int, max_patch_length: int = 0,
                        rule_next: jax.Array | None = None) -> Patches:
  """Patch ids and sizes from boolean starts [batch, length] (position 0 is always a start). `rule_next`
  (bool [batch, length]) says where the rule opens a patch at byte t+1 had byte t's document gone on; by
  default the starts themselves, none after the row. `max_patch_length` applies to both. Patches past the
  `max_patches` slots join the last slot (module docstring)."""
  starts = enforce_max_length(patch_starts.astype(bool), max_patch_length)
  patch_ids = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1  # unclipped
  if rule_next is None:
    rule_next = jnp.concatenate([starts[:, 1:], jnp.zeros_like(starts[:, :1])], axis=1)
  if max_patch_length > 0:  # bytes of t's patch through t
    index = jnp.arange(starts.shape[1])
    run = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1) + 1
    rule_next = rule_next | (run >= max_patch_length)
  last = max_patches - 1
  slots = jnp.minimum(patch_ids, last)
  batch = jnp.arange(starts.shape[0])[:, None]
  bytes_per_patch = jnp.zeros((starts.shape[0], max_patches), jnp.int32).at[batch, slots].add(1)
  return Patches(starts, slots, jnp.minimum(patch_ids + rule_next.astype(jnp.int32), last), bytes_per_patch,
                 patch_ids[:, -1] + 1)


def space_starts(byte_ids: jax.Array) -> jax.Array:
  """Space patching (Sec. 2.2): start at t+1 when byte t is space-like and byte t-1 is not, or byte t is a
  special id; from bytes <= t (position 1 by the rule only after a special or space-like byte 0)."""
  space = is_space_like(byte_ids)
  first_space = space & ~jnp.concatenate([jnp.zeros_like(space[:, :1]), space[:, :-1]], axis=1)
  ends = first_space | (byte_ids >= 256)  # byte t ends its patch
  return jnp.concatenate([jnp.ones_like(space[:, :1]), ends[:, :-1]], axis=1)


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


# positions (within a segment) that always open a patch, as the official patcher: BOS alone, then the rule
FORCED_STARTS = {"space": 2, "entropy": 2, "entropy_monotonic": 3}


def _then_next(x: jax.Array) -> jax.Array:
  """x [batch, length] with one more column (a copy of the last): rules that read bytes <= t for start t+1
  then also decide whether the byte after the row opens a patch."""
  return jnp.concatenate([x, x[:, -1:]], axis=1)


def patch(byte_ids: jax.Array, *, method: str, max_patches: int, patch_size: int = 4,
          entropies: jax.Array | None = None, threshold: float = 0.0, max_patch_length: int = 0,
          patch_starts: jax.Array | None = None, segment_ids: jax.Array | None = None,
          positions: jax.Array | None = None) -> Patches:
  """One entry point: `method` in {'static', 'space', 'entropy', 'entropy_monotonic', 'bpe'}; 'bpe' takes
  the host-computed `patch_starts` ([batch, length], or [batch, length + 1] with the byte after the row).
  With `segment_ids`, every segment start also opens a patch.

  Each rule gives `rule_next[t]`: does byte t+1 open a patch if it continues byte t's document (from bytes
  <= t, so also for the byte after the row; static patches count positions within the document). A
  document's later bytes open patches where it says, so `next_patch_ids` of a document's last byte follows
  the rule, not what comes after it in the row: a document's patches are the same wherever it sits."""
  batch, length = byte_ids.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length), byte_ids.shape)
  in_document = jnp.ones(byte_ids.shape, bool) if segment_ids is None else segment_ids > 0
  if method == "static":
    rule_next = ((positions + 1) % patch_size == 0) & in_document
  elif method == "space":  # the row padding (special ids) is one patch
    rule_next = space_starts(_then_next(byte_ids))[:, 1:] & in_document
  elif method in ("entropy", "entropy_monotonic"):
    if entropies is None:
      raise ValueError(f"patching method '{method}' needs entropies")
    rule_next = entropy_starts(_then_next(entropies), threshold, monotonic=method == "entropy_monotonic")[:, 1:]
  elif method == "bpe":
    if patch_starts is None:
      raise ValueError("patching method 'bpe' needs patch_starts (from bpe_starts)")
    given = patch_starts.astype(bool)
    rule_next = given[:, 1:] if given.shape[1] > length else jnp.concatenate(
        [given[:, 1:], jnp.zeros((batch, 1), bool)], axis=1)
  else:
    raise ValueError(f"unknown patching method '{method}' (known: {', '.join(METHODS)})")
  if method in FORCED_STARTS:
    rule_next |= (positions + 1 < FORCED_STARTS[method]) & in_document
  starts = jnp.concatenate([jnp.ones((batch, 1), bool), rule_next[:, :-1]], axis=1)
  if segment_ids is not None:
    starts = starts | segment_starts(segment_ids, positions)
  return patches_from_starts(starts, max_patches, max_patch_length, rule_next=rule_next)


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
