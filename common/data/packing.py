"""Packing token sequences into fixed-length rows with segment ids, in numpy.

Why not seqio's packer: it may reorder and it truncates what does not fit; here every token is kept
(a document longer than a row is split into row-sized chunks) and chunks keep the corpus order, which
makes the packed cache easy to verify and deterministic across TF versions.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


def pack_chunks(docs: Iterable[np.ndarray], seq_len: int, rows_per_chunk: int = 8192
                ) -> Iterator[dict[str, np.ndarray]]:
  """Next-fit packing of `docs` (1-D token arrays, EOS included) into [rows, seq_len] int32 arrays, yielded
  `rows_per_chunk` finished rows at a time, so that a split of any size is packed in bounded memory.

  Each chunk has `targets`, `segment_ids` (1, 2, ... within a row, 0 on padding) and `positions`
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
        if len(rows) == rows_per_chunk:
          yield _rows_to_arrays(rows, seq_len)
          rows = []
        rows.append([])
        used = 0
      rows[-1].append(chunk)
      used += len(chunk)
  if rows:
    yield _rows_to_arrays(rows, seq_len)


def _rows_to_arrays(rows: list[list[np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
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


def pack_documents(docs: Iterable[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """All rows of `pack_chunks` at once (small corpora)."""
  chunks = list(pack_chunks(docs, seq_len))
  if not chunks:
    return {k: np.zeros((0, seq_len), np.int32) for k in ("targets", "segment_ids", "positions")}
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def make_inputs(targets: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """Decoder inputs: targets shifted right by one inside each segment, 0 (pad = BOS) at its start."""
  inputs = np.zeros_like(targets)
  inputs[..., 1:] = targets[..., :-1]
  inputs[positions == 0] = 0
  return inputs
