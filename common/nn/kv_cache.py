"""Key/value caches for incremental decoding with the attention of `common.nn.attention`.

One `KVCache` per attention layer, preallocated with static shapes so that a decode step is jit-compiled
once. Every slot stores the absolute position and segment id of its key next to the key and value, and the
mask of a decode step is built from those (same segment, key position <= query position, and within the
window), so the cache never needs to be kept in order. Keys and values are stored heads-major, [batch,
kv_heads, slots, head_dim], the layout in which both attention products are batched matmuls, so a decode
step writes its new keys into their slots and attends over the cache where it lies, never copying it:

- a full-attention layer gets `max_len` slots, written in order;
- a windowed layer (Beltagy et al. 2020's sliding window, as in Mistral) gets a ring buffer of `window`
  slots: token i of a row goes to slot i mod window, overwriting the one key that has just left the window.

A full-attention cache (or a windowed one shorter than its window) has no slot past its end: writing there
would wrap around onto keys still needed, so it is refused (`CacheOverflowError`, raised at once outside jit,
from a host callback under jit), whereas the ring buffer of a windowed layer wraps by design.

Rows advance independently (`length` per row, and an `advance` mask per step), which the BLT needs: its
global model takes a step only for the rows whose patch has just closed (Pagnoni et al. 2024, Sec. 3.1).

A per-key attention bias (`common.nn.attention`'s `key_bias`) is given over the tokens of each row, as in the
full forward pass; a slot's token is known from the row's `length` alone (token i sits in slot i mod slots), so
the bias follows its key into any slot, of a full cache or a ring buffer, with nothing more stored.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EMPTY = -1  # position of a slot that holds no key yet


class KVCache(NamedTuple):
  k: jax.Array            # [batch, kv_heads, slots, head_dim]
  v: jax.Array            # [batch, kv_heads, slots, head_dim]
  positions: jax.Array    # int32 [batch, slots], EMPTY where unwritten
  segment_ids: jax.Array  # int32 [batch, slots]
  length: jax.Array       # int32 [batch], tokens written so far (slot of the next one: length mod slots)

  @property
  def slots(self) -> int:
    return self.k.shape[2]


# Logical axes of each field (common.sharding), for placing caches on a mesh.
CACHE_AXES = dict(k=("batch", "kv_heads", "length", "head_dim"), v=("batch", "kv_heads", "length", "head_dim"),
                  positions=("batch", "length"), segment_ids=("batch", "length"), length=("batch",))


class CacheOverflowError(ValueError):
  """Decoding past the end of a cache that is not a ring buffer."""


def _overflow(end: np.ndarray, slots: int) -> None:
  end = np.asarray(end)
  if (end > slots).any():
    raise CacheOverflowError(f"decoding past the end of the KV cache: rows would hold {end.max()} tokens in "
                             f"{slots} slots; initialise the cache with a larger max_len")


def check_room(cache: KVCache, new: int, advance: jax.Array | None = None) -> None:
  """Raises CacheOverflowError if writing `new` tokens (to the rows that advance) would pass the cache's
  last slot."""
  end = cache.length + (new if advance is None else jnp.where(advance, new, 0))
  if not isinstance(end, jax.core.Tracer):
    _overflow(end, cache.slots)
    return
  jax.lax.cond(jnp.any(end > cache.slots), lambda: jax.debug.callback(_overflow, end, cache.slots),
               lambda: None)


def is_ring(cache: KVCache, window: int) -> bool:
  """Whether a layer's cache wraps by design: a window no longer than its slots, so the key a new one
  overwrites has left the window."""
  return bool(window) and cache.slots >= window


def cache_slots(max_len: int, window: int) -> int:
  """Slots a layer needs for sequences of up to `max_len` tokens: the window for a windowed layer."""
  return min(window, max_len) if window else max_len


def init_cache(batch: int, max_len: int, kv_heads: int, head_dim: int, *, window: int = 0,
               dtype=jnp.float32) -> KVCache:
  slots = cache_slots(max_len, window)
  zeros = jnp.zeros((batch, kv_heads, slots, head_dim), dtype)
  return KVCache(zeros, zeros, jnp.full((batch, slots), EMPTY, jnp.int32), jnp.zeros((batch, slots), jnp.int32),
                 jnp.zeros((batch,), jnp.int32))


def _visible(key_pos: jax.Array, key_seg: jax.Array, positions: jax.Array, segment_ids: jax.Array,
             window: int) -> jax.Array:
  """bool [batch, 1, new, keys]: the rule of `attention_mask` (same segment, causal, within the window) for
  queries at `positions` [batch, new] and keys at key_pos [batch, keys], which may be in any order."""
  q_pos = positions[:, :, None]
  mask = (key_pos[:, None, :] != EMPTY) & (key_seg[:, None, :] == segment_ids[:, :, None])
  mask &= key_pos[:, None, :] <= q_pos
  if window:
    mask &= q_pos - key_pos[:, None, :] < window
  return mask[:, None]


def decode_mask(cache: KVCache, positions: jax.Array, segment_ids: jax.Array, *, window: int = 0) -> jax.Array:
  """bool [batch, 1, new, slots + new]: what each of the `new` queries (at `positions`, [batch, new]) may see
  among the cached keys followed by the new keys themselves."""
  return _visible(jnp.concatenate([cache.positions, positions], axis=1),
                  jnp.concatenate([cache.segment_ids, segment_ids], axis=1), positions, segment_ids, window)


def cache_mask(cache: KVCache, positions: jax.Array, segment_ids: jax.Array, *, window: int = 0) -> jax.Array:
  """bool [batch, 1, new, slots]: what each new query may see in a cache its own keys are already written to."""
  return _visible(cache.positions, cache.segment_ids, positions, segment_ids, window)


def slot_tokens(cache: KVCache) -> jax.Array:
  """int32 [batch, slots]: which token of its row (0 = the row's first) each slot holds, negative where the
  slot is still empty: the last one written there, length - 1 - ((length - 1 - slot) mod slots)."""
  last = cache.length[:, None] - 1
  return last - (last - jnp.arange(cache.slots)[None, :]) % cache.slots


def bias_of_tokens(key_bias: jax.Array, tokens: jax.Array) -> jax.Array:
  """key_bias [batch, n] (over the tokens of each row) at token indices [batch, keys]; 0 for a token past its
  end, and anything for a negative index (an empty slot, which the mask hides)."""
  return jnp.take_along_axis(key_bias, jnp.maximum(tokens, 0), axis=1, mode="fill", fill_value=0)


def cache_key_bias(cache: KVCache, key_bias: jax.Array) -> jax.Array:
  """f32 [batch, slots]: the bias of each cached key (`cache_mask`'s keys)."""
  return bias_of_tokens(key_bias, slot_tokens(cache))


def decode_key_bias(cache: KVCache, key_bias: jax.Array, new: int) -> jax.Array:
  """f32 [batch, slots + new]: the bias of the cached keys followed by the `new` keys not yet written
  (`decode_mask`'s keys)."""
  new_tokens = cache.length[:, None] + jnp.arange(new)[None, :]
  return bias_of_tokens(key_bias, jnp.concatenate([slot_tokens(cache), new_tokens], axis=1))


def writes_in_place(cache: KVCache, new: int, window: int, advance: jax.Array | None) -> bool:
  """Whether `new` tokens can be written before they attend: every row advances, and no new key overwrites a
  slot that one of them still needs (one token: the slot it replaces holds a key that has just left the
  window; several: a full-attention cache, sized for the whole sequence, has an empty slot for each)."""
  return advance is None and new <= cache.slots and (new == 1 or not window)


def write(cache: KVCache, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array,
          advance: jax.Array | None = None) -> KVCache:
  """Appends `new` tokens (k, v [batch, new, kv_heads, head_dim], as projected) to each row where `advance`
  (bool [batch], default all). Only the last `slots` of them are kept: earlier ones would be overwritten within
  this call."""
  new = k.shape[1]
  keep = min(new, cache.slots)
  k, v, positions, segment_ids = (a[:, new - keep:] for a in (k, v, positions, segment_ids))
  rows = jnp.arange(k.shape[0])[:, None]
  slot = (cache.length[:, None] + (new - keep) + jnp.arange(keep)[None, :]) % cache.slots  # [batch, keep]
  if advance is None:
    advance = jnp.ones(k.shape[:1], bool)

  def put(buf, val):
    # Advanced indices split by the heads slice: buf[rows, :, slot] is [batch, keep, kv_heads, head_dim], as val.
    index = (rows, slice(None), slot) if buf.ndim == 4 else (rows, slot)
    sel = advance.reshape(-1, *([1] * (val.ndim - 1)))
    return buf.at[index].set(jnp.where(sel, val.astype(buf.dtype), buf[index]))

  return KVCache(put(cache.k, k), put(cache.v, v), put(cache.positions, positions),
                 put(cache.segment_ids, segment_ids), cache.length + jnp.where(advance, new, 0))


def decode_blocks(blocks: Sequence, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                  caches: Sequence[KVCache], advance: jax.Array | None = None,
                  key_bias: jax.Array | None = None) -> tuple[jax.Array, list[KVCache]]:
  """Runs a stack of `common.nn.Block`s on new tokens x [batch, new, d_model] with one cache per block:
  a prompt (prefill) or one token at a time, with an optional per-key bias over each row's tokens. Returns
  (x, the updated caches). Refuses to pass the end of a cache that is not a ring buffer (all caches of a stack
  hold the same rows, so the shortest is checked)."""
  bounded = [cache for block, cache in zip(blocks, caches) if not is_ring(cache, block.attn.window)]
  if bounded:
    check_room(min(bounded, key=lambda c: c.slots), x.shape[1], advance)
  out = []
  for block, cache in zip(blocks, caches):
    x, cache = block.decode(x, positions, segment_ids, cache, advance, key_bias)
    out.append(cache)
  return x, out


def init_caches(blocks: Sequence, batch: int, max_len: int, dtype=jnp.float32) -> list[KVCache]:
  """One empty cache per block of a stack, sized for `max_len` tokens (windowed layers: a ring buffer)."""
  return [init_cache(batch, max_len, b.attn.n_kv_heads, b.attn.head_dim, window=b.attn.window, dtype=dtype)
          for b in blocks]
