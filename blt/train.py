"""`python -m blt.train --config=blt/configs/tiny.py[:patcher=space] --workdir=DIR [--config.K=V ...]`

Trains a BLT (Pagnoni et al. 2024) on the packed byte rows of `common.data.LMData` with the shared loop
(`common.train.loop.train`): metrics.jsonl carries `loss` (next-byte nats), `bytes_per_sec`, `mfu`,
`patches_per_byte` (train), and `eval/loss`, `eval/bpb`, `eval/bytes_per_patch`.

Vocabulary mapping (explicit, both directions in `seqio_to_blt` / `blt_to_seqio`). The data comes from seqio's
ByteVocabulary: id = byte + 3, with 0 = PAD (also the BOS that `make_inputs` puts at the start of each packed
segment), 1 = EOS, 2 = UNK. BLT's vocabulary (`blt.model.VOCAB_SIZE` = 260) is the 256 byte values as
themselves, then BOS = 256, EOS = 257, PAD = 258, BOE = 259. So: byte ids b + 3 -> b; EOS 1 -> 257; a 0 at a
segment start (positions == 0, segment_ids > 0) -> BOS 256; a 0 outside any segment (row padding) -> PAD 258;
UNK 2 (never produced by ByteVocabulary) -> PAD 258. Targets use the same map; padded targets are masked out.

Patch boundaries are computed inside the jitted loss from the BLT input bytes (`blt.patcher`): static and
space patching are causal functions of the bytes (the start at t+1 depends on bytes <= t+1), so the model
stays causal. Patching runs over the whole packed row, not per document (documents in one row may share a
patch at their border; the model does not yet separate documents at the patch level, see blt/README.md).
"""
from __future__ import annotations

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before JAX: see common/train/__main__.py

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

from blt.model import BLT, VOCAB_SIZE  # pylint: disable=g-import-not-at-top
from blt.patcher import patch  # pylint: disable=g-import-not-at-top
from common.config import ConfigError, require  # pylint: disable=g-import-not-at-top

BOS, EOS, PAD, BOE = 256, 257, 258, 259
SEQIO_PAD, SEQIO_EOS, SEQIO_UNK, SEQIO_OFFSET = 0, 1, 2, 3
METHODS = ("static", "space", "entropy", "entropy_monotonic")


def seqio_to_blt(ids, segment_ids, positions):
  """seqio ByteVocabulary ids -> BLT ids (module docstring); works on jnp and numpy arrays alike."""
  xp = jnp if isinstance(ids, jax.Array) else __import__("numpy")
  out = xp.where(ids >= SEQIO_OFFSET, ids - SEQIO_OFFSET, PAD)
  out = xp.where(ids == SEQIO_EOS, EOS, out)
  out = xp.where((ids == SEQIO_PAD) & (segment_ids > 0) & (positions == 0), BOS, out)
  return out.astype(xp.int32)


def blt_to_seqio(ids):
  """BLT ids -> seqio ByteVocabulary ids (BOS and PAD -> 0, EOS -> 1, BOE -> 2 = UNK, which seqio lacks)."""
  xp = jnp if isinstance(ids, jax.Array) else __import__("numpy")
  out = xp.where(ids < 256, ids + SEQIO_OFFSET, SEQIO_PAD)
  out = xp.where(ids == EOS, SEQIO_EOS, out)
  return xp.where(ids == BOE, SEQIO_UNK, out).astype(xp.int32)


def resolve_max_patches(p, seq_len: int) -> int:
  """`model.patching.max_patches`, or for 0 an upper bound on the patches of one row of `seq_len` bytes:
  static ceil(L / min(patch_size, max_patch_length)); space L // 2 + 1 (every space patch but the first holds
  at least one non-space byte followed by a space-like one, i.e. >= 2 bytes, and splitting at
  max_patch_length keeps the count <= half the bytes); entropy L."""
  if int(p.max_patches) > 0:
    return int(p.max_patches)
  if p.method == "static":
    size = int(p.patch_size)
    if int(p.max_patch_length) > 0:
      size = min(size, int(p.max_patch_length))
    return -(-seq_len // size)
  if p.method == "space":
    return seq_len // 2 + 1
  return seq_len


def validate_blt_config(cfg) -> None:
  """Checks model.* of a BLT, naming the key (ConfigError)."""
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
  if p.method in ("entropy", "entropy_monotonic"):
    raise ConfigError(f"config key 'model.patching.method': '{p.method}' patching needs a trained entropy model, "
                      "which blt.train cannot load yet (blt.train_entropy is not written); use 'static' or 'space'")
  require(int(p.patch_size) > 0, "model.patching.patch_size", f"must be positive, got {p.patch_size}")
  require(int(p.max_patches) >= 0, "model.patching.max_patches", f"must be >= 0 (0 = derived), got {p.max_patches}")
  require(int(p.max_patch_length) >= 0, "model.patching.max_patch_length",
          f"must be >= 0 (0 = no limit), got {p.max_patch_length}")
  require(cfg.data.vocab == "byte", "data.vocab", f"BLT reads bytes; must be 'byte', got '{cfg.data.vocab}'")


def blt_loss(model, batch, *, patching, max_patches: int):
  """(summed next-byte cross-entropy over non-padding targets, target count, {'patches_per_byte': patches
  opened at non-padding bytes}) for a BLT on a LMData batch (seqio ids)."""
  seg, pos = batch["segment_ids"], batch["positions"]
  byte_ids = seqio_to_blt(batch["inputs"], seg, pos)
  targets = seqio_to_blt(batch["targets"], seg, jnp.ones_like(pos))  # a target is never BOS
  patches = patch(byte_ids, method=patching.method, max_patches=max_patches, patch_size=int(patching.patch_size),
                  threshold=float(patching.threshold), max_patch_length=int(patching.max_patch_length))
  logits = model(byte_ids, patches.patch_ids, max_patches, pos, seg)
  mask = batch["loss_mask"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  n_patches = jnp.sum(patches.patch_starts * mask)
  overflow = jnp.sum((patches.patch_ids >= max_patches) * mask)  # bytes whose patch has no slot (should be 0)
  return jnp.sum(nll * mask), jnp.sum(mask), {"patches_per_byte": n_patches, "overflow_bytes": overflow}


def blt_summary(sums: dict) -> dict:
  """Eval values: bits per byte (every BLT target is one byte or EOS, as for the byte LMs) and mean bytes per
  patch (non-padding bytes over the patches that start on them)."""
  from common.train.lm_task import nats_summary
  out = nats_summary(sums, bytes_per_target=True)
  if sums.get("patches_per_byte", 0) > 0:
    out["bytes_per_patch"] = sums["weight"] / sums["patches_per_byte"]
  return out


def make_task(cfg):
  """The Task the shared loop trains (common.train.loop.Task)."""
  from common.data import LMData
  from common.flops import training_flops_per_token
  from common.train.loop import Task
  validate_blt_config(cfg)
  seq_len = int(cfg.data.seq_len)
  max_patches = resolve_max_patches(cfg.model.patching, seq_len)
  data = LMData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  m = cfg.model
  return Task(
      build_model=lambda: BLT(m, rngs=nnx.Rngs(params=int(cfg.train.seed))),
      loss_fn=functools.partial(blt_loss, patching=m.patching, max_patches=max_patches),
      data=data,
      train_flops_per_example=training_flops_per_token(m, seq_len) * seq_len,
      units_per_example=seq_len,
      throughput_key="bytes_per_sec",
      eval_summary=blt_summary,
  )


def cli() -> None:
  from common.train.__main__ import cli as common_cli
  common_cli(make_task, validate_blt_config)


if __name__ == "__main__":
  cli()
