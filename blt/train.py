"""`python -m blt.train --config=blt/configs/tiny.py[:patcher=space|entropy|bpe,...] --workdir=DIR [--config.K=V ...]`

Trains a BLT (Pagnoni et al. 2024) on the packed byte rows of `common.data.LMData` with the shared loop
(`common.train.loop.train`): metrics.jsonl carries `loss` (next-byte nats, EOS targets included), `bytes_per_sec`,
`mfu`, and per target byte (the loop divides every metric sum by the step's targets) `patches_per_byte`,
`overflow_bytes` and `byte_targets`; eval lines carry `eval/loss`, `eval/bpb`, `eval/bytes_per_patch` and
`eval/overflow_bytes` (a count over the eval set).

The vocabulary map from the data's seqio byte ids and the patching inputs of the pipeline are `blt.data`'s.

Bits per byte, the one definition of this repository's byte-level comparisons (`eval/bpb` here and of the
dense LM on bytes, `common.tasks.lm`; every arm of `blt.reproduce`): the next-token cross-entropy summed over
all scored targets, end-of-document (EOS) predictions included, over ln 2 x the bytes of text they cover,
which are the byte targets (values < 256; EOS is no byte). On a held-out split this is total nats / (ln 2 x
the split's text bytes), whatever the model's tokens are. A model uniform over the 256 bytes and EOS scores
log2(257) x (1 + EOS targets per byte target), a bit above 8.

Patch slots: the global model and the decoder's cross-attention run over `model.patching.max_patches` slots a
row, a static shape. `max_patches` 0 resolves at start-up (`resolve`): static and space patching to a
bound no row exceeds; entropy and BPE patching, which may open a patch at any byte, to SLOT_MARGIN x the
most patches in a row of the calibration sample (the first training rows, as patched here) rounded up to a
multiple of 8, at most seq_len, so that they cost the wall time their FLOPs say instead of a slot per byte.
A row with more patches overflows: the bytes past the last slot join it (`blt.patcher`), are trained and
scored like every byte, and the BLT stays causal; they are predicted without the global outputs of their own
patches. `overflow_bytes` counts them. Cached generation (`blt.generate`) gives every patch of its rows a slot,
so it equals this forward on every row that does not overflow; on a row that does, the two may differ from
the last slot's first byte on.

Start-up (`common.train.__main__.main`): `resolve` fills what the config derives (with
`model.patching.calibrate` the entropy threshold, then `max_patches`), `validate_blt_config` checks the
resolved config once, `make_task` builds. The resolved config is DIR/config.json; a resumed run resolves the
same values from the same data and models.
"""
from __future__ import annotations

import functools
import math
import os

import jax.numpy as jnp
import optax
from flax import nnx

from blt.calibrate import calibrate_threshold, patches_per_row, sample_patching_inputs
from blt.data import ENTROPY_METHODS, blt_data, max_segments_per_row, seqio_to_blt
from blt.entropy import EntropyScorer, load_entropy_model
from blt.generate import generate_samples
from blt.model import BLT, DECODER_GROUPINGS, VOCAB_SIZE, Ablations, decoder_grouping
from blt.patcher import METHODS, patch
from common.config import require
from common.flops import training_flops_per_token
from common.nn import DTYPES
from common.tasks.base import Task


# Patch slots per patch of the fullest calibration row (entropy and BPE patching, `resolve_max_patches`): rows
# past the sample may hold more patches than any row in it.
SLOT_MARGIN = 1.25


def resolve_max_patches(p, seq_len: int, max_segments: int = 1, most_patches: int = 0) -> int:
  """`model.patching.max_patches`, or for 0 a bound on the patches of one row of `seq_len` bytes. Static and
  space: an upper bound for rows holding at most `max_segments` segments (the row padding counts as one),
  each of which opens its own patches: static sum_s ceil(n_s / k) <= (L + S (k - 1)) // k with
  k = min(patch_size, max_patch_length); space L // 2 + 2 S (within a segment the two forced first patches
  may hold one byte each, every later one but the last ends at a space-like byte after a non-space-like one,
  i.e. holds >= 2 bytes, and splitting at max_patch_length keeps the count <= half the bytes). Entropy and
  bpe, which may open a patch at any byte: measured, SLOT_MARGIN x `most_patches` (the most patches in a row
  of the calibration sample, `blt.calibrate.patches_per_row`) rounded up to a multiple of 8, at most L; a row
  may exceed it (overflow, module docstring); without `most_patches`, L."""
  if int(p.max_patches) > 0:
    return int(p.max_patches)
  if p.method == "static":
    size = int(p.patch_size)
    if int(p.max_patch_length) > 0:
      size = min(size, int(p.max_patch_length))
    return min((seq_len + max_segments * (size - 1)) // size, seq_len)
  if p.method == "space":
    return min(seq_len // 2 + 2 * max_segments, seq_len)
  if most_patches > 0:
    return min(8 * math.ceil(SLOT_MARGIN * most_patches / 8), seq_len)
  return seq_len


def validate_blt_config(cfg) -> None:
  """Checks model.* of a BLT, naming the key (ConfigError); cheap (no model or data is loaded). A config with
  `max_patches` 0 or `calibrate` (not yet resolved) passes."""
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
  require(m.get("dtype", "float32") in DTYPES, "model.dtype", f"must be one of {sorted(DTYPES)}, got '{m.get('dtype')}'")
  require(decoder_grouping(m) in DECODER_GROUPINGS, "model.decoder_grouping",
          f"must be one of {', '.join(DECODER_GROUPINGS)}, got '{decoder_grouping(m)}'")
  Ablations.from_config(m)  # cross_attn_k, encoder_cross, decoder_cross, hash_functions, decoder_patch_scope
  require("patching" in m, "model.patching", "missing (method, patch_size, max_patches, threshold, ...)")
  p = m.patching
  require(p.method in METHODS, "model.patching.method", f"must be one of {', '.join(METHODS)}, got '{p.method}'")
  require(int(p.patch_size) > 0, "model.patching.patch_size", f"must be positive, got {p.patch_size}")
  require(int(p.max_patches) >= 0, "model.patching.max_patches", f"must be >= 0 (0 = derived), got {p.max_patches}")
  require(int(p.max_patch_length) >= 0, "model.patching.max_patch_length",
          f"must be >= 0 (0 = no limit), got {p.max_patch_length}")
  require(isinstance(p.get("reset_at_newline", False), bool), "model.patching.reset_at_newline",
          f"must be true or false (the entropy model's context restarts at each newline), "
          f"got {p.get('reset_at_newline')!r}")
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


def blt_loss(model, batch, *, patching, max_patches: int):
  """(summed next-byte cross-entropy over non-padding targets, target count, metric sums): `patches_per_byte`
  (patches opened at non-padding bytes), `overflow_bytes` (non-padding bytes past the last of the
  `max_patches` slots, which share it: module docstring) and `byte_targets` (targets that are byte values, not
  EOS: the bytes of bits per byte) for a BLT on a LMData batch."""
  seg, pos = batch["segment_ids"], batch["positions"]
  byte_ids = seqio_to_blt(batch["inputs"], seg, pos)
  targets = seqio_to_blt(batch["targets"], seg, jnp.ones_like(pos))  # a target is never BOS
  patches = patch(byte_ids, method=patching.method, max_patches=max_patches, patch_size=int(patching.patch_size),
                  entropies=batch.get("entropies"), threshold=float(patching.threshold),
                  max_patch_length=int(patching.max_patch_length), patch_starts=batch.get("patch_starts"),
                  segment_ids=seg, positions=pos)
  logits = model(byte_ids, patches.patch_ids, max_patches, pos, seg, patches.next_patch_ids)
  mask = batch["loss_mask"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  n_patches = jnp.sum(patches.patch_starts * mask)
  past_slots = jnp.cumsum(patches.patch_starts, axis=1) > max_patches  # the unclipped patch id >= max_patches
  return jnp.sum(nll * mask), jnp.sum(mask), {
      "patches_per_byte": n_patches, "overflow_bytes": jnp.sum(past_slots * mask),
      "byte_targets": jnp.sum(mask * (targets < 256))}


def blt_summary(sums: dict) -> dict:
  """Eval values: bits per byte (all nats, EOS predictions included, over the byte targets: module docstring),
  mean bytes per patch (non-padding bytes over the patches that start on them) and `overflow_bytes` (the
  count over the eval set)."""
  out = {}
  if sums.get("byte_targets", 0) > 0:
    out["bpb"] = sums["loss"] / sums["byte_targets"] / math.log(2.0)
  if sums.get("patches_per_byte", 0) > 0:
    out["bytes_per_patch"] = sums["weight"] / sums["patches_per_byte"]
  if "overflow_bytes" in sums:
    out["overflow_bytes"] = sums["overflow_bytes"]
  return out


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
    if cfg.model.patching.method in ENTROPY_METHODS and "entropy" not in loaded:
      loaded["entropy"] = load_entropy_model(cfg.model.patching.entropy_model)[0]
    texts = generate_samples(model, cfg, prompts, n_bytes, entropy_model=loaded.get("entropy"))
    return dict(zip(prompts, texts))

  return samples


def entropy_scorer(p) -> EntropyScorer | None:
  """The frozen entropy model of `model.patching` as the input pipeline runs it, or None (not entropy
  patching)."""
  if p.method not in ENTROPY_METHODS:
    return None
  return EntropyScorer(load_entropy_model(p.entropy_model)[0], reset_at_newline=p.get("reset_at_newline", False))


def resolve(cfg):
  """Fills what the config derives (in place; returns cfg), deterministically, so that a resumed run finds the
  same as DIR/config.json records: with `model.patching.calibrate` the entropy threshold θ whose mean patch
  size on the first training rows is `model.patching.patch_size` (`blt.calibrate`; rounded to 1e-4 nats; the
  resolved config records θ with `calibrate` off), then `model.patching.max_patches` 0 -> the bound of
  `resolve_max_patches`: static and space patching read every row for the most segments in one; entropy and
  BPE patching count the patches of the calibration sample (the first training rows, about
  `blt.calibrate.DEFAULT_SAMPLE_BYTES` bytes) at the resolved θ."""
  p, seq_len = cfg.model.patching, int(cfg.data.seq_len)
  calibrates = p.method in ENTROPY_METHODS and p.get("calibrate", False)
  measures = p.method in (*ENTROPY_METHODS, "bpe") and int(p.max_patches) == 0
  sample = sample_patching_inputs(blt_data(cfg, entropy_scorer(p))) if calibrates or measures else None
  if calibrates:
    theta, _ = calibrate_threshold(sample["entropies"], float(p.patch_size), monotonic=p.method != "entropy",
                                   max_patch_length=int(p.max_patch_length), segment_ids=sample["segment_ids"],
                                   positions=sample["positions"])
    p.update(threshold=round(theta, 4), calibrate=False)
  if measures:
    p.max_patches = resolve_max_patches(p, seq_len, most_patches=int(patches_per_row(sample, p).max()))
  elif int(p.max_patches) == 0:
    p.max_patches = resolve_max_patches(p, seq_len, max_segments_per_row(blt_data(cfg)))
  return cfg


def make_task(cfg):
  """The Task the shared loop trains (common.train.loop.Task), of a resolved config (`resolve`)."""
  m, seq_len = cfg.model, int(cfg.data.seq_len)
  p = m.patching
  scorer = entropy_scorer(p)
  return Task(
      build_model=lambda: BLT(m, rngs=nnx.Rngs(params=int(cfg.train.seed))),
      loss_fn=functools.partial(blt_loss, patching=p, max_patches=int(p.max_patches)),
      data=blt_data(cfg, scorer),
      train_flops_per_example=training_flops_per_token(m, seq_len) * seq_len,
      units_per_example=seq_len,
      throughput_key="bytes_per_sec",
      eval_summary=blt_summary,
      eval_samples=sample_fn(cfg),
  )


def cli() -> None:
  from common.train.__main__ import cli as common_cli
  common_cli(make_task, validate_blt_config, resolve)

if __name__ == "__main__":
  cli()
