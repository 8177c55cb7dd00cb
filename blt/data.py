"""BLT's data: the packed byte rows of `common.data.LMData` in BLT's vocabulary, with what the host-side
patchers add to each batch.

Vocabulary mapping (explicit, both directions in `seqio_to_blt` / `blt_to_seqio`). The data comes from seqio's
ByteVocabulary: id = byte + 3, with 0 = PAD (also the BOS that `make_inputs` puts at the start of each packed
segment), 1 = EOS, 2 = UNK. BLT's vocabulary (`blt.model.VOCAB_SIZE` = 260) is the 256 byte values as
themselves, then BOS = 256, EOS = 257, PAD = 258, BOE = 259. So: byte ids b + 3 -> b; EOS 1 -> 257; a 0 at a
segment start (positions == 0, segment_ids > 0) -> BOS 256; a 0 outside any segment (row padding) -> PAD 258;
UNK 2 (never produced by ByteVocabulary) -> PAD 258. Targets use the same map; padded targets are masked out.

Patching in the input pipeline (`PatchingData`). Static and space patch starts are computed inside the jitted
loss from the BLT input bytes. Entropy patching (Sec. 2.3) and BPE patching (Sec. 2.4) are computed here: the
frozen entropy model (`blt.entropy.EntropyScorer`) adds `entropies` [batch, length] to every batch (a function
of the batch alone, so deterministic in the data position, and the same on resume); the SentencePiece model of
`model.patching.spm_model` adds `patch_starts`. Every path opens a patch at each packed segment start, so
documents sharing a row never share a patch.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from blt.patcher import bpe_starts
from common.config import ConfigError
from common.data import LMData

BOS, EOS, PAD, BOE = 256, 257, 258, 259
SEQIO_PAD, SEQIO_EOS, SEQIO_UNK, SEQIO_OFFSET = 0, 1, 2, 3
ENTROPY_METHODS = ("entropy", "entropy_monotonic")


def seqio_to_blt(ids, segment_ids, positions):
  """seqio ByteVocabulary ids -> BLT ids (module docstring); works on jnp and numpy arrays alike."""
  xp = jnp if isinstance(ids, jax.Array) else np
  out = xp.where(ids >= SEQIO_OFFSET, ids - SEQIO_OFFSET, PAD)
  out = xp.where(ids == SEQIO_EOS, EOS, out)
  out = xp.where((ids == SEQIO_PAD) & (segment_ids > 0) & (positions == 0), BOS, out)
  return out.astype(xp.int32)


def blt_to_seqio(ids):
  """BLT ids -> seqio ByteVocabulary ids (BOS and PAD -> 0, EOS -> 1, BOE -> 2 = UNK, which seqio lacks)."""
  xp = jnp if isinstance(ids, jax.Array) else np
  out = xp.where(ids < 256, ids + SEQIO_OFFSET, SEQIO_PAD)
  out = xp.where(ids == EOS, SEQIO_EOS, out)
  return xp.where(ids == BOE, SEQIO_UNK, out).astype(xp.int32)


class PatchingData:
  """An LMData whose batches also carry what the host-side patchers compute from the BLT input bytes:
  `entropies` (f32 [batch, length], entropy patching) or `patch_starts` (bool [batch, length], BPE).
  Everything else (row counts, vocab, ...) is the wrapped LMData's. Every process computes them for the whole
  global batch, as it reads the whole global batch (common.train.loop)."""

  def __init__(self, data, *, entropy_scorer=None, sentencepiece_processor=None):
    self.data = data
    self.entropy_scorer = entropy_scorer
    self.sentencepiece_processor = sentencepiece_processor

  def __getattr__(self, name):
    return getattr(self.data, name)

  def add_patching_inputs(self, batch: dict) -> dict:
    seg, pos = batch["segment_ids"], batch["positions"]
    byte_ids = seqio_to_blt(batch["inputs"], seg, pos)
    out = dict(batch)
    if self.entropy_scorer is not None:
      out["entropies"] = self.entropy_scorer(byte_ids, pos, seg)
    if self.sentencepiece_processor is not None:  # with the byte after the row (the last target)
      following = seqio_to_blt(batch["targets"][:, -1:], seg[:, -1:], np.ones_like(pos[:, -1:]))
      out["patch_starts"] = bpe_starts(np.concatenate([byte_ids, following], axis=1),
                                       np.concatenate([seg, seg[:, -1:]], axis=1), self.sentencepiece_processor)
    return out

  def train_batch(self, position: int) -> dict:
    return self.add_patching_inputs(self.data.train_batch(position))

  def eval_batches(self, max_batches: int = 0):
    for batch in self.data.eval_batches(max_batches):
      yield self.add_patching_inputs(batch)


def max_segments_per_row(data) -> int:
  """The most segments (documents or document pieces, plus the row padding) in any train or eval row, read
  through the public batch interface (one pass over an epoch: positions 0 .. rows - 1 cover every row; under
  a second for the tiny configs; a large corpus should set `model.patching.max_patches` instead)."""
  def segments(batch):
    seg = batch["segment_ids"]
    return int((np.diff(seg, axis=1) != 0).sum(axis=1).max()) + 1
  most = max((segments(b) for b in data.eval_batches()), default=1)
  for position in range(0, data.num_train_rows, data.batch_size):
    most = max(most, segments(data.train_batch(position)))
  return most


def load_sentencepiece(path: str):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top  (only BPE patching needs it)
  try:
    return spm.SentencePieceProcessor(model_file=os.path.expanduser(path))
  except (OSError, RuntimeError) as e:
    raise ConfigError(f"config key 'model.patching.spm_model': cannot read '{path}' ({e})") from None


def blt_data(cfg, entropy_scorer=None):
  """The byte rows of `cfg.data` for `cfg.model.patching`: wrapped in `PatchingData` for entropy patching (with
  `entropy_scorer`, a `blt.entropy.EntropyScorer` of the frozen entropy model) and BPE patching."""
  data = LMData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  p = cfg.model.patching
  if p.method in ENTROPY_METHODS:
    return PatchingData(data, entropy_scorer=entropy_scorer)
  if p.method == "bpe":
    return PatchingData(data, sentencepiece_processor=load_sentencepiece(p.spm_model))
  return data
