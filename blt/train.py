"""`python -m blt.train --config=blt/configs/tiny.py[:patcher=space|entropy|bpe,...] --workdir=DIR [--config.K=V ...]`

Trains a BLT (Pagnoni et al. 2024) on the packed byte rows of `common.data.LMData` with the shared loop
(`common.train.loop.train`): metrics.jsonl carries `loss` (next-byte nats, EOS targets included), `bytes_per_sec`,
`mfu`, `patches_per_byte` (train), and `eval/loss`, `eval/bpb`, `eval/bytes_per_patch`.

Vocabulary mapping (explicit, both directions in `seqio_to_blt` / `blt_to_seqio`). The data comes from seqio's
ByteVocabulary: id = byte + 3, with 0 = PAD (also the BOS that `make_inputs` puts at the start of each packed
segment), 1 = EOS, 2 = UNK. BLT's vocabulary (`blt.model.VOCAB_SIZE` = 260) is the 256 byte values as
themselves, then BOS = 256, EOS = 257, PAD = 258, BOE = 259. So: byte ids b + 3 -> b; EOS 1 -> 257; a 0 at a
segment start (positions == 0, segment_ids > 0) -> BOS 256; a 0 outside any segment (row padding) -> PAD 258;
UNK 2 (never produced by ByteVocabulary) -> PAD 258. Targets use the same map; padded targets are masked out.

Bits per byte counts bytes only: `eval/bpb` is the cross-entropy summed over targets that are byte values
(< 256) divided by their number and by ln 2. EOS targets are trained on (they are in `loss`) but are neither
cost nor count in bpb, so a model uniform over the 256 byte values scores exactly 8.

Patching (`blt.patcher`). Static and space patch starts are computed inside the jitted loss from the BLT input
bytes. Entropy patching (Sec. 2.3) and BPE patching (Sec. 2.4) are computed in the input pipeline
(`PatchingData`): the frozen entropy model of `model.patching.entropy_model` adds `entropies` [batch, length] to
every batch (a function of the batch alone, so deterministic in the data position, and the same on resume);
the SentencePiece model of `model.patching.spm_model` adds `patch_starts`. Every path opens a patch at each
packed segment start, so documents sharing a row never share a patch.
"""
from __future__ import annotations

import functools
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before JAX: see common/train/__main__.py

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

from blt.model import BLT, VOCAB_SIZE  # pylint: disable=g-import-not-at-top
from blt.patcher import METHODS, bpe_starts, patch  # pylint: disable=g-import-not-at-top
from common.config import ConfigError, require  # pylint: disable=g-import-not-at-top

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


def resolve_max_patches(p, seq_len: int, max_segments: int = 1) -> int:
  """`model.patching.max_patches`, or for 0 an upper bound on the patches of one row of `seq_len` bytes
  holding at most `max_segments` segments (the row padding counts as one), each of which opens its own
  patches: static sum_s ceil(n_s / k) <= (L + S (k - 1)) // k with k = min(patch_size, max_patch_length);
  space L // 2 + S (within a segment every space patch but the first holds a non-space byte and the
  space-like byte before the next one, i.e. >= 2 bytes, and splitting at max_patch_length keeps the count
  <= half the bytes); entropy and bpe L."""
  if int(p.max_patches) > 0:
    return int(p.max_patches)
  if p.method == "static":
    size = int(p.patch_size)
    if int(p.max_patch_length) > 0:
      size = min(size, int(p.max_patch_length))
    return min((seq_len + max_segments * (size - 1)) // size, seq_len)
  if p.method == "space":
    return min(seq_len // 2 + max_segments, seq_len)
  return seq_len


def validate_blt_config(cfg) -> None:
  """Checks model.* of a BLT, naming the key (ConfigError); cheap (no model or data is loaded)."""
  m = cfg.model
  require(m.get("name") == "blt", "model.name", f"must be 'blt' for blt.train, got '{m.get('name')}'")
  require(int(m.vocab_size) == VOCAB_SIZE, "model.vocab_size", f"must be {VOCAB_SIZE}, got {m.vocab_size}")
  for key in ("d_local", "n_heads_local", "n_layers_encoder", "n_layers_decoder", "n_heads_cross", "d_global",
              "n_layers_global", "n_heads_global", "hash_table_size"):
    require(int(m[key]) > 0, f"model.{key}", f"must be positive, got {m[key]}")
  for d, h in (("d_local", "n_heads_local"), ("d_local", "n_heads_cross"), ("d_global", "n_heads_global")):
    require(int(m[d]) % int(m[h]) == 0, f"model.{d}", f"{m[d]} is not divisible by model.{h}={m[h]}")
    require((int(m[d]) // int(m[h])) % 2 == 0 or h == "n_heads_cross", f"model.{h}",
            f"RoPE needs an even head dimension, got model.{d}/model.{h} = {int(m[d]) // int(m[h])}")
  require(int(m.local_window) >= 0, "model.local_window", f"must be >= 0, got {m.local_window}")
  require("patching" in m, "model.patching", "missing (method, patch_size, max_patches, threshold, ...)")
  p = m.patching
  require(p.method in METHODS, "model.patching.method", f"must be one of {', '.join(METHODS)}, got '{p.method}'")
  require(int(p.patch_size) > 0, "model.patching.patch_size", f"must be positive, got {p.patch_size}")
  require(int(p.max_patches) >= 0, "model.patching.max_patches", f"must be >= 0 (0 = derived), got {p.max_patches}")
  require(int(p.max_patch_length) >= 0, "model.patching.max_patch_length",
          f"must be >= 0 (0 = no limit), got {p.max_patch_length}")
  if p.method in ENTROPY_METHODS:
    workdir = p.get("entropy_model", "")
    require(bool(workdir), "model.patching.entropy_model",
            f"'{p.method}' patching needs the workdir of a trained entropy model (python -m blt.train_entropy)")
    require(os.path.isfile(os.path.join(workdir, "config.json")), "model.patching.entropy_model",
            f"'{workdir}' holds no trained entropy model (no config.json)")
  if p.method == "bpe":
    spm_model = p.get("spm_model", "")
    require(bool(spm_model) and os.path.isfile(os.path.expanduser(spm_model)), "model.patching.spm_model",
            f"'{spm_model}': no such SentencePiece model (python -m common.data.train_tokenizer --out=PATH.model)")
  require(cfg.data.vocab == "byte", "data.vocab", f"BLT reads bytes; must be 'byte', got '{cfg.data.vocab}'")


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
    if self.sentencepiece_processor is not None:
      out["patch_starts"] = bpe_starts(byte_ids, seg, self.sentencepiece_processor)
    return out

  def train_batch(self, position: int) -> dict:
    return self.add_patching_inputs(self.data.train_batch(position))

  def eval_batches(self, max_batches: int = 0):
    for batch in self.data.eval_batches(max_batches):
      yield self.add_patching_inputs(batch)


def blt_loss(model, batch, *, patching, max_patches: int):
  """(summed next-byte cross-entropy over non-padding targets, target count, metric sums): `patches_per_byte`
  (patches opened at non-padding bytes), `overflow_bytes`, and for bits per byte `byte_nll` / `byte_targets`
  (cross-entropy and count of the targets that are byte values, not EOS) for a BLT on a LMData batch."""
  seg, pos = batch["segment_ids"], batch["positions"]
  byte_ids = seqio_to_blt(batch["inputs"], seg, pos)
  targets = seqio_to_blt(batch["targets"], seg, jnp.ones_like(pos))  # a target is never BOS
  patches = patch(byte_ids, method=patching.method, max_patches=max_patches, patch_size=int(patching.patch_size),
                  entropies=batch.get("entropies"), threshold=float(patching.threshold),
                  max_patch_length=int(patching.max_patch_length), patch_starts=batch.get("patch_starts"),
                  segment_ids=seg, positions=pos)
  logits = model(byte_ids, patches.patch_ids, max_patches, pos, seg)
  mask = batch["loss_mask"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  byte_mask = mask * (targets < 256)
  n_patches = jnp.sum(patches.patch_starts * mask)
  overflow = jnp.sum((patches.patch_ids >= max_patches) * mask)  # bytes whose patch has no slot (should be 0)
  return jnp.sum(nll * mask), jnp.sum(mask), {
      "patches_per_byte": n_patches, "overflow_bytes": overflow,
      "byte_nll": jnp.sum(nll * byte_mask), "byte_targets": jnp.sum(byte_mask)}


def blt_summary(sums: dict) -> dict:
  """Eval values: bits per byte over byte targets only (module docstring) and mean bytes per patch
  (non-padding bytes over the patches that start on them)."""
  out = {}
  if sums.get("byte_targets", 0) > 0:
    out["bpb"] = sums["byte_nll"] / sums["byte_targets"] / math.log(2.0)
  if sums.get("patches_per_byte", 0) > 0:
    out["bytes_per_patch"] = sums["weight"] / sums["patches_per_byte"]
  return out


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


def _load_sentencepiece(path: str):
  import sentencepiece as spm
  try:
    return spm.SentencePieceProcessor(model_file=os.path.expanduser(path))
  except (OSError, RuntimeError) as e:
    raise ConfigError(f"config key 'model.patching.spm_model': cannot read '{path}' ({e})") from None


def add_patching_inputs(cfg, data):
  """The LMData wrapped for entropy or BPE patching (else unchanged). With `model.patching.calibrate`, entropy
  patching first sets `model.patching.threshold` to the θ whose mean patch size on the first training rows is
  `model.patching.patch_size` (`blt.calibrate`; rounded to 1e-4 nats so that a resumed run finds the same)."""
  p = cfg.model.patching
  if p.method in ENTROPY_METHODS:
    from blt.calibrate import calibrate_threshold, sample_patching_inputs
    from blt.entropy import EntropyScorer, load_entropy_model
    data = PatchingData(data, entropy_scorer=EntropyScorer(load_entropy_model(p.entropy_model)[0]))
    if p.get("calibrate", False):
      sample = sample_patching_inputs(data)
      theta, _ = calibrate_threshold(sample["entropies"], float(p.patch_size), monotonic=p.method != "entropy",
                                     max_patch_length=int(p.max_patch_length), segment_ids=sample["segment_ids"],
                                     positions=sample["positions"])
      p.threshold = round(theta, 4)
  elif p.method == "bpe":
    data = PatchingData(data, sentencepiece_processor=_load_sentencepiece(p.spm_model))
  return data


def sample_fn(cfg):
  """model -> {prompt: greedy continuation} for the eval log (`eval.sample_bytes` bytes after each of
  `eval.sample_prompts`, by cached generation, `blt.generate`); None when `eval.sample_bytes` is 0 or the patcher
  looks ahead (BPE), which incremental generation cannot follow."""
  n_bytes = int(cfg.eval.get("sample_bytes", 0))
  if n_bytes <= 0 or cfg.model.patching.method == "bpe":
    return None
  prompts = [str(p) for p in cfg.eval.get("sample_prompts", ("def ",))]
  loaded = {}

  def samples(model):
    from blt.entropy import load_entropy_model
    from blt.generate import generate_samples
    if cfg.model.patching.method in ENTROPY_METHODS and "entropy" not in loaded:
      loaded["entropy"] = load_entropy_model(cfg.model.patching.entropy_model)[0]
    texts = generate_samples(model, cfg, prompts, n_bytes, entropy_model=loaded.get("entropy"))
    return dict(zip(prompts, texts))

  return samples


def make_task(cfg):
  """The Task the shared loop trains (common.train.loop.Task)."""
  from common.data import LMData
  from common.flops import training_flops_per_token
  from common.tasks.base import Task
  validate_blt_config(cfg)
  seq_len = int(cfg.data.seq_len)
  data = add_patching_inputs(cfg, LMData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed))
  m = cfg.model
  needs_bound = int(m.patching.max_patches) == 0 and m.patching.method in ("static", "space")
  max_patches = resolve_max_patches(m.patching, seq_len, max_segments_per_row(data) if needs_bound else 1)
  return Task(
      build_model=lambda: BLT(m, rngs=nnx.Rngs(params=int(cfg.train.seed))),
      loss_fn=functools.partial(blt_loss, patching=m.patching, max_patches=max_patches),
      data=data,
      train_flops_per_example=training_flops_per_token(m, seq_len) * seq_len,
      units_per_example=seq_len,
      throughput_key="bytes_per_sec",
      eval_summary=blt_summary,
      eval_samples=sample_fn(cfg),
  )


def cli() -> None:
  from common.train.__main__ import cli as common_cli
  common_cli(make_task, validate_blt_config)


if __name__ == "__main__":
  cli()
