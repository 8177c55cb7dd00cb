"""Mixed-modal documents -> packed rows -> batches of the layout MoT, MoMa and Transfusion train on.

A document is `text <boi> image <eoi> EOS`, `<boi> image <eoi> text EOS`, the same with `<boa> audio <eoa>`,
or plain text; documents are packed whole (first fit) into rows of `seq_len`, never split, so that an image
is always seen with its caption. Rows hold only targets, segment ids, positions and (Transfusion) the patch
each image token stands for; everything else of a batch is derived from them when the batch is drawn.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from common.data.mixed_modal.vocab import EOS, IMAGE, TEXT, MixedVocab

ROW_KEYS = ("targets", "segment_ids", "positions", "patch_index")


def build_document(vocab: MixedVocab, parts: Sequence[tuple[str, object]]) -> np.ndarray:
  """int32 [n] token ids of ('text', str) / ('image', codes) / ('audio', codes) parts, in order, each image
  between <boi> <eoi> and each clip between <boa> <eoa>, ending with EOS."""
  pieces = []
  for kind, value in parts:
    if kind == "text":
      pieces.append(vocab.encode_text(value))
    elif kind == "image":
      pieces += [[vocab.boi], vocab.image_tokens(value), [vocab.eoi]]
    elif kind == "audio":
      pieces += [[vocab.boa], vocab.audio_tokens(value), [vocab.eoa]]
    else:
      raise ValueError(f"unknown document part {kind!r}")
  pieces.append([EOS])
  return np.concatenate([np.asarray(p, np.int32) for p in pieces])


def patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
  """[N, H, W, C] -> [N, (H/p)*(W/p), p*p*C]: raster order of patches, (row, col, channel) inside each
  (Transfusion sec. 2.2: an image is a sequence of patch vectors)."""
  n, h, w, c = images.shape
  p = patch_size
  x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: np.ndarray, image_size: int, patch_size: int) -> np.ndarray:
  """Inverse of `patchify` for square images: [N, n_patches, p*p*C] -> [N, H, W, C]."""
  n, _, dim = patches.shape
  p, g = patch_size, image_size // patch_size
  c = dim // (p * p)
  return patches.reshape(n, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, image_size, image_size, c)


def first_fit(lengths: Sequence[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, offset) of each document: the first row with room for it, else a new row. Whole documents
  only; a document longer than `seq_len` is an error (the caller cuts text to fit)."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and lengths.max() > seq_len:
    raise ValueError(f"a document of {lengths.max()} tokens does not fit a row of {seq_len}")
  free = np.zeros(len(lengths), np.int64)  # free slots of each open row (at most one row per document)
  rows = np.empty(len(lengths), np.int64)
  offsets = np.empty(len(lengths), np.int64)
  n_rows = 0
  for i, n in enumerate(lengths):
    fits = np.flatnonzero(free[:n_rows] >= n)
    r = int(fits[0]) if fits.size else n_rows
    if r == n_rows:
      free[r] = seq_len
      n_rows += 1
    rows[i], offsets[i] = r, seq_len - free[r]
    free[r] -= n
  return rows, offsets


def pack_rows(docs: Sequence[np.ndarray], seq_len: int,
              patch_index: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """[rows, seq_len] int32 `targets`, `segment_ids` (1, 2, ... per row, 0 = padding), `positions`
  (restarting at 0 per document) and `patch_index`: for Transfusion (`patch_index[d]`: int32 [len(doc)],
  the global patch index of each image-placeholder token of document d, -1 elsewhere) the patch each
  target stands for, -1 elsewhere and without `patch_index`."""
  rows, offsets = first_fit([len(d) for d in docs], seq_len)
  n_rows = int(rows.max()) + 1 if len(docs) else 0
  out = {k: np.zeros((n_rows, seq_len), np.int32) for k in ROW_KEYS}
  out["patch_index"][:] = -1
  next_segment = np.ones(n_rows, np.int32)
  for d, (doc, r, o) in enumerate(zip(docs, rows, offsets)):
    span = slice(o, o + len(doc))
    out["targets"][r, span] = doc
    out["segment_ids"][r, span] = next_segment[r]
    out["positions"][r, span] = np.arange(len(doc))
    next_segment[r] += 1
    if patch_index is not None:
      out["patch_index"][r, span] = patch_index[d]
  return out


def _shift_in_segment(x: np.ndarray, positions: np.ndarray, fill) -> np.ndarray:
  """Next-token inputs: x shifted right by one inside each document, `fill` at its first position."""
  out = np.full_like(x, fill)
  out[..., 1:] = x[..., :-1]
  out[positions == 0] = fill
  return out


def make_batch(rows: dict[str, np.ndarray], idx: np.ndarray, vocab: MixedVocab, setting: str,
               patch_table: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The batch of rows `idx` (see the module docstring); `patch_table` f32 [n_patches, patch_dim] for
  Transfusion."""
  targets = rows["targets"][idx]
  segment_ids = rows["segment_ids"][idx]
  positions = rows["positions"][idx]
  inputs = _shift_in_segment(targets, positions, 0)  # 0 (pad) doubles as BOS, as in common.data
  modality = vocab.modality_of(inputs)
  target_modality = vocab.modality_of(targets)
  is_image = modality == IMAGE
  starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
  image_ids = (np.cumsum(starts, axis=1) * is_image).astype(np.int32)
  real = segment_ids > 0
  batch = dict(inputs=inputs, targets=targets, positions=positions, segment_ids=segment_ids,
               modality=modality, target_modality=target_modality, image_ids=image_ids)
  if setting == "transfusion":
    patch_index = _shift_in_segment(rows["patch_index"][idx], positions, -1)
    patches = np.zeros((*patch_index.shape, patch_table.shape[-1]), np.float32)
    patches[patch_index >= 0] = patch_table[patch_index[patch_index >= 0]]
    batch["patches"] = patches
    batch["loss_mask"] = (real & (target_modality == TEXT) & ~is_image).astype(np.float32)
  else:
    batch["loss_mask"] = real.astype(np.float32)
  return batch
