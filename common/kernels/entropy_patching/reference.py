"""Entropy patching in plain jnp: the specification the Pallas kernel is tested against.

BLT (Pagnoni et al. 2024, Sec. 2.3) cuts a byte stream into patches where a small byte LM is uncertain.
From the entropy model's logits [batch, length, vocab] (the prediction made at t is of byte t+1):
  H(t) = -sum_v p_t(v) log p_t(v), in nats;
  global rule:    start[t+1] = H(t) > threshold;
  monotonic rule: start[t+1] = H(t) - H(t-1) > threshold, for t >= 1 (start[1] is False);
  start[0] = True; `extra_starts` (e.g. the document boundaries of packed rows) are added to the rule's;
  then `max_patch_length` > 0 adds a start once a patch holds that many bytes; patch_ids = cumsum(start) - 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def entropies_from_logits(logits: jax.Array) -> jax.Array:
  """[batch, length, vocab] (any float dtype) -> f32 [batch, length], in nats. A -inf logit (an id of
  probability 0, e.g. a padded vocabulary's column) adds 0, not 0 * -inf = NaN."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def rule_starts(entropies: jax.Array, threshold, monotonic: bool) -> jax.Array:
  """bool [batch, length]: starts from the global or monotonic rule alone, start[0] = True."""
  length = entropies.shape[1]
  threshold = jnp.asarray(threshold, jnp.float32)
  prev = jnp.pad(entropies, ((0, 0), (1, 0)))[:, :length]           # H(t-1) at t
  if monotonic:
    prev2 = jnp.pad(entropies, ((0, 0), (2, 0)))[:, :length]        # H(t-2) at t
    starts = (prev - prev2 > threshold) & (jnp.arange(length) >= 2)
  else:
    starts = (prev > threshold) & (jnp.arange(length) >= 1)
  return starts.at[:, 0].set(True)


def apply_max_patch_length(starts: jax.Array, max_patch_length: int) -> jax.Array:
  """Adds the starts forced by `max_patch_length` (0: none); start[0] is set.

  Applied left to right, the limit opens a patch at s + k * max_patch_length (k >= 1) after every start s
  of the rule, until the rule's next start, because a forced start resets the count just like a rule start
  does. So start'[t] = start[t] or (t - s(t)) % max_patch_length == 0, with s(t) the last rule start <= t:
  a running max, parallel over the length, instead of a sequential scan."""
  starts = starts.at[:, 0].set(True)
  if max_patch_length <= 0:
    return starts
  position = jnp.arange(starts.shape[1], dtype=jnp.int32)
  last_rule_start = jax.lax.cummax(jnp.where(starts, position, 0), axis=1)
  return starts | ((position - last_rule_start) % max_patch_length == 0)


def entropy_patching(logits: jax.Array, threshold, *, monotonic: bool = False, max_patch_length: int = 0,
                     extra_starts: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits [batch, length, vocab] -> (entropies f32, starts bool, patch_ids int32), each [batch, length];
  `extra_starts` bool [batch, length] or None."""
  entropies = entropies_from_logits(logits)
  starts = rule_starts(entropies, threshold, monotonic)
  if extra_starts is not None:
    starts = starts | extra_starts
  starts = apply_max_patch_length(starts, max_patch_length)
  return entropies, starts, jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1
