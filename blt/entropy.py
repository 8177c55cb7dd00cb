"""Next-byte entropies of a small byte-level LM, the signal of entropy patching (Pagnoni et al. 2024,
Sec. 2.3, Eq. H(x_i) = -sum_v p_e(x_i = v | x_<i) log p_e(x_i = v | x_<i)).

Units: **nats** (natural logarithm), so thresholds are in nats; divide by ln 2 for bits (`to_bits`).
Indexing: `entropies[:, t]` is the entropy of the distribution predicted at position t, i.e. of byte t+1
given bytes <= t, which is what `blt.patcher.entropy_starts` expects.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """H = -sum_v p_v log p_v over the last axis, in nats, computed in f32 from log-softmax (no log(0)).
  logits [..., vocab] -> [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def to_bits(entropy_nats: jax.Array) -> jax.Array:
  return entropy_nats / math.log(2.0)


@nnx.jit
def next_byte_entropies(entropy_model: nnx.Module, byte_ids: jax.Array, positions: jax.Array | None = None,
                        segment_ids: jax.Array | None = None) -> jax.Array:
  """Entropies [batch, length] in nats of a causal byte LM (`model(tokens, positions, segment_ids)` ->
  logits [batch, length, vocab], e.g. `common.models.DenseLM` on bytes with a sliding window)."""
  return entropy_from_logits(entropy_model(byte_ids, positions, segment_ids))
