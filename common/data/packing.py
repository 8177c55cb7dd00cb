"""Packing token sequences into fixed-length rows with segment ids, in numpy.

Why not seqio's packer: it may reorder and it truncates what does not fit; here every token is kept
(a document longer than a row is split into row-sized chunks) and chunks keep the corpus order, which
makes the packed cache easy to verify and deterministic across TF versions.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def pack_documents(docs: Iterable[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Next-fit packing of `docs` (1-D token arrays, EOS included) into [rows, seq_len] int32 arrays.

  Returns `targets`, `segment_ids` (1, 2, ... within a row, 0 on padding) and `positions`
  (0, 1, ... restarting at each segment, 0 on padding).
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  rows: list[list[np.ndarray]] = []
  used = seq_len  # forces a new row for the first chunk
  for doc in docs:
    doc = np.asarray(doc, dtype=np.int32).reshape(-1)
    for start in range(0, len(doc), seq_len):
      chunk = doc[start:start + seq_len]
      if used + len(chunk) > seq_len:
        rows.append([])
        used = 0
      rows[-1].append(chunk)
      used += len(chunk)
  targets = np.zeros((len(rows), seq_len), np.int32)
  segment_ids = np.zeros_like(targets)
  positions = np.zeros_like(targets)
  for r, chunks in enumerate(rows):
    offset = 0
    for s, chunk in enumerate(chunks, start=1):
      n = len(chunk)
      targets[r, offset:offset + n] = chunk
      segment_ids[r, offset:offset + n] = s
      positions[r, offset:offset + n] = np.arange(n, dtype=np.int32)
      offset += n
  return {"targets": targets, "segment_ids": segment_ids, "positions": positions}


def make_inputs(targets: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """Decoder inputs: targets shifted right by one inside each segment, 0 (pad = BOS) at its start."""
  inputs = np.zeros_like(targets)
  inputs[..., 1:] = targets[..., :-1]
  inputs[positions == 0] = 0
  return inputs
