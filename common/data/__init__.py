"""Data pipeline shared by every trainer: corpora, vocabularies, seqio tasks, packed LM batches.

Importing this package is cheap (no TensorFlow, no seqio): those are imported lazily only when a
vocabulary is built or a packed cache has to be created, so that a trainer whose cache already exists
starts instantly.
"""
from __future__ import annotations

import os

import ml_collections

from common.config import DataError




DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "meta_papers_jax", "data")


def default_data_config() -> ml_collections.ConfigDict:
  """The `data.*` block that config files start from: the offline embedded corpus, byte vocabulary."""
  return ml_collections.ConfigDict(dict(
      source="embedded",           # 'embedded' | 'files' | 'tfds'
      path="",                     # glob of user text files (source='files'); '*' and '**' allowed
      tfds_name="",                # a tfds dataset already prepared under tfds_data_dir
      tfds_data_dir="",
      tfds_train_split="train",
      tfds_eval_split="validation",
      text_key="text",             # the text feature of the tfds examples
      vocab="byte",                # 'byte' | 'spm'
      spm_model="",                # a SentencePiece .model (see common.data.train_tokenizer)
      seq_len=256,
      max_train_bytes=0,           # 0 = no limit; small values make tiny configs start fast
      max_eval_bytes=0,
      validation_fraction=0.03,    # share of embedded/user files held out (by a stable path hash)
      eval_on_train=False,         # no held-out files: train on all of them and evaluate on the same ones
                                   # (needed for a single file, which is refused otherwise)
      shards=0,                    # training-data shards, each read and packed by one process (0: one per
                                   # process); the batch depends on it, not on the process count
      cache_dir=DEFAULT_CACHE_DIR,
  ))


def with_defaults(data_cfg) -> ml_collections.ConfigDict:
  """A copy of `data_cfg` with every missing key filled from default_data_config(), so that a config
  file written before a key existed keeps working (extra keys are kept, not judged, here)."""
  merged = default_data_config().to_dict()
  merged.update(dict(data_cfg) if data_cfg is not None else {})
  return ml_collections.ConfigDict(merged)


_LAZY = {
    "LMData": "pipeline",
    "get_vocabulary": "vocab",
    "register_lm_task": "tasks",
    "pack_documents": "packing",
    "list_documents": "corpus",
}


def __getattr__(name):
  # Lazy re-exports keep `import common.data` free of TensorFlow/seqio.
  if name in _LAZY:
    import importlib
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataError", "default_data_config", "with_defaults", "DEFAULT_CACHE_DIR", *_LAZY]
