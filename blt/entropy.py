"""Next-byte entropies of a small byte-level LM, the signal of entropy patching (Pagnoni et al. 2024,
Sec. 2.3, Eq. H(x_i) = -sum_v p_e(x_i = v | x_<i) log p_e(x_i = v | x_<i)).

Units: **nats** (natural logarithm), so thresholds are in nats; divide by ln 2 for bits (`to_bits`).
Indexing: `entropies[:, t]` is the entropy of the distribution predicted at position t, i.e. of byte t+1
given bytes <= t, which is what `blt.patcher.entropy_starts` expects.

The entropy model is the common dense LM trained on the byte corpus by `python -m blt.train_entropy` (Sec. 2.3:
a small byte LM with a sliding attention window). It reads seqio ByteVocabulary ids (byte + 3, BOS/PAD 0,
EOS 1), so BLT ids are mapped back with `blt.data.blt_to_seqio` before it runs (`EntropyScorer`).

Vocabulary: H is over the ByteVocabulary's 259 real ids (`ENTROPY_VOCAB_SIZE`: PAD/BOS 0, EOS 1, UNK 2, the
bytes 3..258), not over the model's padded output layer (`common.models.dense_lm.padded_vocab_size` rounds
259 up to 384): the padding columns get -inf logits. PAD and UNK stay in, as every special id does in the
official entropy (its 260-way softmax, specials included): they are real ids of the model's vocabulary, never
targets in training, so a trained model gives them almost no mass and they barely move H.

Computation: `entropy_from_logits` goes through `common.kernels.entropy_patching.entropies`, the Pallas kernel
on GPU and the jnp reference elsewhere (`impl`), which agree on -inf logits.

Newline reset (`reset_at_newline`, `model.patching.reset_at_newline`): the paper resets the entropy model's
context at new lines against "entropy drift", entropies falling as repetitive context grows (Sec. 4.4, for
its large entropy-patched runs; the official code has no such option: it scores fixed-length chunks).
Here each line is its own document for the entropy model: a line begins AT a newline byte, so the prediction
at byte t reads bytes s..t, s the last newline at or before t (or the document start). The newline leads its
line, as BOS leads a document: every prediction still has a byte to read (were a line to begin after its
newline, the prediction made at the newline would read nothing), and the first byte of every line is
predicted from the newline alone, so whether it opens a patch no longer depends on the lines before. Still
causal: whether t starts a line is byte t's own. The entropy model is trained on whole documents
(`blt.train_entropy`), so a context that begins at a newline is new to it; the paper does not say how its
entropy model was trained for the reset.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from blt.data import SEQIO_OFFSET, blt_to_seqio
from blt.patcher import segment_starts
from common.config import ConfigError
from common.kernels.entropy_patching import entropies as kernel_entropies

ENTROPY_MODEL_KEY = "model.patching.entropy_model"
ENTROPY_VOCAB_SIZE = 256 + SEQIO_OFFSET  # the ByteVocabulary's real ids: PAD/BOS 0, EOS 1, UNK 2, bytes 3..258
NEWLINE = 0x0A  # a byte, so the same id in BLT's vocabulary


def entropy_from_logits(logits: jax.Array, *, vocab_size: int | None = None, impl: str = "auto") -> jax.Array:
  """H = -sum_v p_v log p_v over the last axis, in nats (f32), over the ids v < `vocab_size` only (None: all):
  the columns past it, an output layer's padding, become -inf logits, i.e. probability 0. logits [..., vocab]
  -> [...], through the entropy-patching op (`impl`: 'auto' is the Pallas kernel on GPU, the reference
  elsewhere; no gradient flows)."""
  if vocab_size is not None and vocab_size < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  lead = logits.shape[:-1]
  rows = logits.reshape(-1, lead[-1] if lead else 1, logits.shape[-1])  # [batch, length, vocab], as the op takes
  return kernel_entropies(rows, impl=impl).reshape(lead)


def to_bits(entropy_nats: jax.Array) -> jax.Array:
  return entropy_nats / math.log(2.0)


def line_segments(byte_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(segment ids, positions) [batch, length] under which the entropy model reads every line as its own
  document (module docstring): a new segment at each packed segment start and at each newline byte, positions
  counted from there. Causal: both depend on bytes <= t only."""
  starts = segment_starts(segment_ids, positions) | ((byte_ids == NEWLINE) & (segment_ids > 0))
  index = jnp.broadcast_to(jnp.arange(byte_ids.shape[1]), byte_ids.shape)
  line_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  line_positions = positions - jnp.take_along_axis(positions, line_start, axis=1)
  return jnp.cumsum(starts, axis=1, dtype=jnp.int32), line_positions.astype(jnp.int32)


@nnx.jit
def next_byte_entropies(entropy_model: nnx.Module, byte_ids: jax.Array, positions: jax.Array | None = None,
                        segment_ids: jax.Array | None = None) -> jax.Array:
  """Entropies [batch, length] in nats of a causal byte LM on seqio byte ids (`model(tokens, positions,
  segment_ids)` -> logits [batch, length, vocab], e.g. `common.models.DenseLM` on bytes with a sliding window),
  over the real ids of its vocabulary."""
  return entropy_from_logits(entropy_model(byte_ids, positions, segment_ids), vocab_size=ENTROPY_VOCAB_SIZE)


class EntropyScorer:
  """The frozen entropy model as a jitted function of BLT byte ids -> entropies (numpy f32 [batch, length]),
  over the real vocabulary, with the context reset at each newline if `reset_at_newline` (module docstring);
  `impl` as `entropy_from_logits`.

  Its parameters are an argument of the compiled function, not constants folded into it, so one compilation
  serves every batch of a shape and the BLT train step never holds them."""

  def __init__(self, entropy_model: nnx.Module, *, reset_at_newline: bool = False, impl: str = "auto"):
    graphdef, state = nnx.split(entropy_model)
    # Uncommitted copies (a loaded model sits on one device): the data pipeline calls the scorer inside the
    # training loop's mesh, where arguments committed elsewhere are refused.
    self.state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)

    def entropies(state, byte_ids, positions, segment_ids):
      model = nnx.merge(graphdef, state)
      if reset_at_newline:
        segment_ids, positions = line_segments(byte_ids, segment_ids, positions)
      logits = model(blt_to_seqio(byte_ids), positions, segment_ids)
      return entropy_from_logits(logits, vocab_size=ENTROPY_VOCAB_SIZE, impl=impl)

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
