"""One id space for text, image and audio tokens (Chameleon sec. 2.1: a single vocabulary over modalities).

Text keeps the byte vocabulary of `common.data` (seqio ByteVocabulary: pad 0, eos 1, unk 2, byte b -> b + 3)
so that text-only checkpoints and metrics (bits per byte) carry over; the modality markers follow, then the
image codes, then the audio codes, each block disjoint so that the modality of a token is a range lookup.
"""
from __future__ import annotations

import dataclasses

import numpy as np

MODALITIES = ("text", "image", "audio")
TEXT, IMAGE, AUDIO = 0, 1, 2

PAD, EOS = 0, 1
BYTE_OFFSET = 3
TEXT_SIZE = 256 + BYTE_OFFSET  # 259 byte-vocabulary ids


@dataclasses.dataclass(frozen=True)
class MixedVocab:
  """Layout: text [0, 259), boi 259, eoi 260, boa 261, eoa 262, image codes, audio codes."""
  image_codebook: int
  audio_codebook: int = 0

  boi = TEXT_SIZE
  eoi = TEXT_SIZE + 1
  boa = TEXT_SIZE + 2
  eoa = TEXT_SIZE + 3
  image_offset = TEXT_SIZE + 4

  def __post_init__(self):
    if self.image_codebook < 0 or self.audio_codebook < 0:
      raise ValueError(f"codebook sizes must be >= 0, got {self.image_codebook}, {self.audio_codebook}")

  @property
  def audio_offset(self) -> int:
    return self.image_offset + self.image_codebook

  @property
  def size(self) -> int:
    return self.audio_offset + self.audio_codebook

  def ranges(self) -> dict[int, list[tuple[int, int]]]:
    """Half-open id ranges of each modality (the markers count as text: they are predicted like text)."""
    return {TEXT: [(0, self.image_offset)],
            IMAGE: [(self.image_offset, self.audio_offset)],
            AUDIO: [(self.audio_offset, self.size)]}

  def modality_of(self, ids) -> np.ndarray:
    """int32 modality (TEXT/IMAGE/AUDIO) of each id, any shape (host arrays; the batch carries it for jit)."""
    ids = np.asarray(ids)
    out = np.full(ids.shape, TEXT, np.int32)
    out[(ids >= self.image_offset) & (ids < self.audio_offset)] = IMAGE
    out[(ids >= self.audio_offset) & (ids < self.size)] = AUDIO
    return out

  def encode_text(self, text: str | bytes) -> np.ndarray:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, np.uint8).astype(np.int32) + BYTE_OFFSET

  def decode_text(self, ids) -> str:
    """The bytes among `ids` (other ids, markers and codes, are skipped)."""
    ids = np.asarray(ids).reshape(-1)
    byte_ids = ids[(ids >= BYTE_OFFSET) & (ids < TEXT_SIZE)]
    return (byte_ids - BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def image_tokens(self, codes) -> np.ndarray:
    return np.asarray(codes, np.int32) + self.image_offset

  def audio_tokens(self, codes) -> np.ndarray:
    return np.asarray(codes, np.int32) + self.audio_offset
