"""Vocabularies by config name: 'byte' (no file needed, always offline) or a SentencePiece model."""
from __future__ import annotations

import functools
import hashlib
import os

from common.data import DataError, with_defaults

VOCABS = ("byte", "spm")


def _spm_path(data_cfg) -> str:
  path = os.path.expanduser(data_cfg.spm_model or "")
  if not path or not os.path.isfile(path):
    raise DataError(
        f"data.spm_model={data_cfg.spm_model!r}: no such file (train one with "
        "`python -m common.data.train_tokenizer --out=PATH.model`)")
  return path


def vocab_fingerprint(data_cfg) -> str:
  """Identifies the vocabulary for cache keys without importing seqio (content hash of the model)."""
  if data_cfg.vocab == "byte":
    return "byte"
  if data_cfg.vocab == "spm":
    with open(_spm_path(data_cfg), "rb") as f:
      return "spm:" + hashlib.sha1(f.read()).hexdigest()
  raise DataError(f"data.vocab={data_cfg.vocab!r} is unknown (expected one of {VOCABS})")


def vocab_size(data_cfg) -> int:
  """Ids of the vocabulary `data.vocab` names, without seqio or the data rows (a model's vocab_size is resolved
  before any data is built): the 256 bytes after pad, eos, unk, or the SentencePiece model's pieces."""
  data_cfg = with_defaults(data_cfg)
  if vocab_fingerprint(data_cfg) == "byte":  # validates the name and the model file
    return 256 + 3
  import sentencepiece  # pylint: disable=g-import-not-at-top
  return int(sentencepiece.SentencePieceProcessor(model_file=_spm_path(data_cfg)).get_piece_size())


@functools.lru_cache(maxsize=None)
def _make(kind: str, path: str, fingerprint: str):  # fingerprint: a replaced model is reloaded
  del fingerprint
  from common.data._tf import import_seqio  # pylint: disable=g-import-not-at-top
  seqio = import_seqio()
  if kind == "byte":
    return seqio.ByteVocabulary()
  return seqio.SentencePieceVocabulary(path)


def get_vocabulary(data_cfg):
  """The seqio.Vocabulary named by `data.vocab` (pad 0, eos 1, unk 2 in both cases)."""
  data_cfg = with_defaults(data_cfg)
  fingerprint = vocab_fingerprint(data_cfg)  # validates the name and the model file
  path = os.path.abspath(_spm_path(data_cfg)) if data_cfg.vocab == "spm" else ""
  return _make(data_cfg.vocab, path, fingerprint)
