"""Next-byte entropies of a small byte-level LM, the signal of entropy patching (Pagnoni et al. 2024,
Sec. 2.3, Eq. H(x_i) = -sum_v p_e(x_i = v | x_<i) log p_e(x_i = v | x_<i)).

Units: **nats** (natural logarithm), so thresholds are in nats; divide by ln 2 for bits (`to_bits`).
Indexing: `entropies[:, t]` is the entropy of the distribution predicted at position t, i.e. of byte t+1
given bytes <= t, which is what `blt.patcher.entropy_starts` expects.

The entropy model is the common dense LM trained on the byte corpus by `python -m blt.train_entropy` (Sec. 2.3:
a small byte LM with a sliding attention window). It reads seqio ByteVocabulary ids (byte + 3, BOS/PAD 0,
EOS 1), so BLT ids are mapped back with `blt.data.blt_to_seqio` before it runs (`EntropyScorer`); its entropy
is over its whole output vocabulary, the byte ids and the few special ones.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from blt.data import blt_to_seqio
from common.config import ConfigError

ENTROPY_MODEL_KEY = "model.patching.entropy_model"


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


class EntropyScorer:
  """The frozen entropy model as a jitted function of BLT byte ids -> entropies (numpy f32 [batch, length]).

  Its parameters are an argument of the compiled function, not constants folded into it, so one compilation
  serves every batch of a shape and the BLT train step never holds them."""

  def __init__(self, entropy_model: nnx.Module):
    graphdef, state = nnx.split(entropy_model)
    # Uncommitted copies (a loaded model sits on one device): the data pipeline calls the scorer inside the
    # training loop's mesh, where arguments committed elsewhere are refused.
    self.state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)

    def entropies(state, byte_ids, positions, segment_ids):
      model = nnx.merge(graphdef, state)
      return entropy_from_logits(model(blt_to_seqio(byte_ids), positions, segment_ids))

    self._entropies = jax.jit(entropies)

  def __call__(self, byte_ids, positions=None, segment_ids=None) -> np.ndarray:
    byte_ids = jnp.asarray(byte_ids, jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(byte_ids.shape[1]), byte_ids.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(byte_ids)
    return np.asarray(self._entropies(self.state, byte_ids, jnp.asarray(positions, jnp.int32),
                                      jnp.asarray(segment_ids, jnp.int32)))


def _refuse(workdir: str, what: str) -> ConfigError:
  return ConfigError(f"config key '{ENTROPY_MODEL_KEY}': '{workdir}' {what} (train an entropy model with "
                     "`python -m blt.train_entropy --config=blt/configs/entropy_tiny.py --workdir=DIR`)")


def load_entropy_model(workdir: str) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """(model, config) of a `blt.train_entropy` run: DIR/config.json and the parameters of the newest readable
  checkpoint under DIR/checkpoints, on the first local device (`common.train.restore`). Anything missing or
  unreadable is a ConfigError naming `model.patching.entropy_model` and the path."""
  from common.models import build_model
  from common.train.restore import load_run_model, read_run_config
  if not workdir:
    raise _refuse(workdir, "is empty: entropy patching needs a trained entropy model")
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise _refuse(workdir, "holds no config.json")
  cfg = read_run_config(workdir, ENTROPY_MODEL_KEY)
  if cfg.get("model", {}).get("name") != "dense_lm" or cfg.get("data", {}).get("vocab") != "byte":
    raise _refuse(workdir, "is not a byte-level dense LM run (model.name 'dense_lm', data.vocab 'byte')")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise _refuse(workdir, "holds no checkpoints")
  model, _ = load_run_model(workdir, cfg, lambda: build_model(cfg.model, seed=0), key=ENTROPY_MODEL_KEY)
  return model, cfg
