"""`python -m blt.train --config=blt/configs/tiny.py[:patcher=space|entropy|bpe,...] --workdir=DIR [--config.K=V ...]`

Trains a BLT (Pagnoni et al. 2024) on the packed byte rows of `common.data.LMData` with the shared loop
(`common.train.loop.train`): metrics.jsonl carries `loss` (next-byte nats, EOS targets included), `bytes_per_sec`,
`mfu`, `patches_per_byte` (train), and `eval/loss`, `eval/bpb`, `eval/bytes_per_patch`.

The vocabulary map from the data's seqio byte ids and the patching inputs of the pipeline are `blt.data`'s.

Bits per byte counts bytes only: `eval/bpb` is the cross-entropy summed over targets that are byte values
(< 256) divided by their number and by ln 2. EOS targets are trained on (they are in `loss`) but are neither
cost nor count in bpb, so a model uniform over the 256 byte values scores exactly 8.

Start-up (`common.train.__main__.main`): `resolve` fills what the config derives (`model.patching.max_patches`
0 -> a bound no row exceeds; with `model.patching.calibrate`, the entropy threshold), `validate_blt_config`
checks the resolved config once, `make_task` builds. The resolved config is DIR/config.json.
"""
from __future__ import annotations

import functools
import math
import os

import jax.numpy as jnp
import optax
from flax import nnx

from blt.calibrate import calibrate_threshold, sample_patching_inputs
from blt.data import ENTROPY_METHODS, blt_data, max_segments_per_row, seqio_to_blt
from blt.entropy import EntropyScorer, load_entropy_model
from blt.generate import generate_samples
from blt.model import BLT, DECODER_GROUPINGS, VOCAB_SIZE, decoder_grouping
from blt.patcher import METHODS, patch
from common.config import require
from common.flops import training_flops_per_token
from common.nn import DTYPES
from common.tasks.base import Task


def resolve_max_patches(p, seq_len: int, max_segments: int = 1) -> int:
  """`model.patching.max_patches`, or for 0 an upper bound on the patches of one row of `seq_len` bytes
  holding at most `max_segments` segments (the row padding counts as one), each of which opens its own
  patches: static sum_s ceil(n_s / k) <= (L + S (k - 1)) // k with k = min(patch_size, max_patch_length);
  space L // 2 + 2 S (within a segment the two forced first patches may hold one byte each, every later
  one but the last ends at a space-like byte after a non-space-like one, i.e. holds >= 2 bytes, and
  splitting at max_patch_length keeps the count <= half the bytes); entropy and bpe L."""
  if int(p.max_patches) > 0:
    return int(p.max_patches)
  if p.method == "static":
    size = int(p.patch_size)
    if int(p.max_patch_length) > 0:
      size = min(size, int(p.max_patch_length))
    return min((seq_len + max_segments * (size - 1)) // size, seq_len)
  if p.method == "space":
    return min(seq_len // 2 + 2 * max_segments, seq_len)
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
  logits = model(byte_ids, patches.patch_ids, max_patches, pos, seg, patches.next_patch_ids)
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


def resolve(cfg):
  """Fills what the config derives (in place; returns cfg): `model.patching.max_patches` 0 -> the bound of
  `resolve_max_patches` (static and space patching read every row for the most segments in one), and with
  `model.patching.calibrate` the entropy threshold θ whose mean patch size on the first training rows is
  `model.patching.patch_size` (`blt.calibrate`; rounded to 1e-4 nats, so that a resumed run finds the same; the
  resolved config records θ with `calibrate` off)."""
  p, seq_len = cfg.model.patching, int(cfg.data.seq_len)
  if p.method in ENTROPY_METHODS and p.get("calibrate", False):
    data = blt_data(cfg, EntropyScorer(load_entropy_model(p.entropy_model)[0]))
    sample = sample_patching_inputs(data)
    theta, _ = calibrate_threshold(sample["entropies"], float(p.patch_size), monotonic=p.method != "entropy",
                                   max_patch_length=int(p.max_patch_length), segment_ids=sample["segment_ids"],
                                   positions=sample["positions"])
    p.update(threshold=round(theta, 4), calibrate=False)
  if int(p.max_patches) == 0:
    counts_segments = p.method in ("static", "space")
    p.max_patches = resolve_max_patches(p, seq_len, max_segments_per_row(blt_data(cfg)) if counts_segments else 1)
  return cfg


def make_task(cfg):
  """The Task the shared loop trains (common.train.loop.Task), of a resolved config (`resolve`)."""
  m, seq_len = cfg.model, int(cfg.data.seq_len)
  p = m.patching
  scorer = EntropyScorer(load_entropy_model(p.entropy_model)[0]) if p.method in ENTROPY_METHODS else None
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
