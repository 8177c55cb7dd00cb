"""seqio registration of the language-modelling task over the configured source.

The task name is a hash of the config keys that change its examples, so two configs in one process
(a sweep, a test) get two tasks instead of silently sharing the first one registered.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

import ml_collections

from common.data import DataError, corpus, vocab as vocab_lib, with_defaults

SOURCES = ("embedded", "files", "tfds")
_FILE_KEYS = ("source", "path", "validation_fraction", "eval_on_train", "max_train_bytes", "max_eval_bytes")
_TFDS_KEYS = ("source", "tfds_name", "tfds_data_dir", "tfds_train_split", "tfds_eval_split",
              "text_key")


def source_keys(data_cfg) -> dict:
  """The config values that define the source's documents (validated; no TensorFlow needed)."""
  if data_cfg.source not in SOURCES:
    raise DataError(f"data.source={data_cfg.source!r} is unknown (expected one of {SOURCES})")
  keys = _TFDS_KEYS if data_cfg.source == "tfds" else _FILE_KEYS
  out = {k: data_cfg.get(k) for k in keys}
  if data_cfg.source == "tfds":
    if not data_cfg.tfds_name:
      raise DataError("data.tfds_name is empty: data.source='tfds' needs a prepared dataset name")
    out["tfds_data_dir"] = os.path.abspath(os.path.expanduser(data_cfg.tfds_data_dir or "")) \
        if data_cfg.tfds_data_dir else ""
  if data_cfg.source == "files":
    out["path"] = os.path.abspath(os.path.expanduser(data_cfg.path or ""))
  return out


def task_name(data_cfg, shard: tuple[int, int] = (0, 1)) -> str:
  keys = dict(source_keys(data_cfg), vocab=vocab_lib.vocab_fingerprint(data_cfg))
  if shard[1] > 1 and data_cfg.source != "tfds":  # tfds shards at read time (seqio's shard_info), one task
    keys["shard"] = list(shard)
  digest = hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]
  return f"meta_papers_lm_{data_cfg.source}_{digest}"


def check_tfds_prepared(data_cfg):
  """Raises DataError unless the tfds dataset is already prepared on disk: we never download."""
  from common.data._tf import import_tfds  # pylint: disable=g-import-not-at-top
  tfds = import_tfds()
  data_dir = source_keys(data_cfg)["tfds_data_dir"] or None
  where = f"data.tfds_name={data_cfg.tfds_name!r} under data.tfds_data_dir={data_cfg.tfds_data_dir!r}"
  if data_dir and not os.path.isdir(data_dir):
    raise DataError(f"{where}: the data dir does not exist (prepare the dataset there first; "
                    "nothing is downloaded at run time)")
  try:
    builder = tfds.builder(data_cfg.tfds_name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends: name unknown and not on disk
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise DataError(f"{where}: no prepared dataset found ({type(e).__name__}: {first_line})") from e
  if not builder.is_prepared():
    raise DataError(f"{where}: the dataset is not prepared (run its download_and_prepare yourself; "
                    "nothing is downloaded at run time)")
  return builder


def _file_dataset_fn(frozen: dict, shard: tuple[int, int], split: str, shuffle_files: bool, seed=None):
  """One {'text'} example per document, in the corpus' sorted order (packing relies on the order;
  shuffling happens later on packed rows, so `shuffle_files` and `seed` are ignored). The training files of
  shard (index, count) are every count-th one from index: a process opens only its own."""
  del shuffle_files, seed
  from common.data._tf import import_tf  # pylint: disable=g-import-not-at-top
  tf = import_tf()
  root, rels = corpus.list_documents(ml_collections.ConfigDict(frozen), split)
  if split == "train":
    rels = corpus.shard_of(rels, *shard)

  def gen():
    for rel in rels:
      yield {"text": corpus.read_text(os.path.join(root, rel))}

  return tf.data.Dataset.from_generator(
      gen, output_signature={"text": tf.TensorSpec((), tf.string)})


def register_lm_task(data_cfg, shard: tuple[int, int] = (0, 1)) -> str:
  """Registers (once per distinct config and training shard) and returns the name of the seqio LM task."""
  data_cfg = with_defaults(data_cfg)
  name = task_name(data_cfg, shard)
  from common.data._tf import import_seqio  # pylint: disable=g-import-not-at-top
  seqio = import_seqio()
  if name in seqio.TaskRegistry.names():
    return name
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (configured by import_seqio)
  if data_cfg.source == "tfds":
    builder = check_tfds_prepared(data_cfg)
    tfds_name = data_cfg.tfds_name  # seqio wants an explicit version: take the prepared one
    if ":" not in tfds_name:
      tfds_name = f"{tfds_name}:{builder.version}"
    source = seqio.TfdsDataSource(
        tfds_name=tfds_name,
        tfds_data_dir=source_keys(data_cfg)["tfds_data_dir"] or None,
        splits={"train": data_cfg.tfds_train_split, "validation": data_cfg.tfds_eval_split},
        read_only=True)  # read_only: as_dataset on the prepared files, never download_and_prepare
    text_key = data_cfg.text_key or "text"
  else:
    frozen = {k: data_cfg.get(k) for k in _FILE_KEYS}
    corpus.list_documents(ml_collections.ConfigDict(frozen), "train")  # fail now on a bad glob
    source = seqio.FunctionDataSource(
        dataset_fn=functools.partial(_file_dataset_fn, frozen, tuple(shard)), splits=("train", "validation"))
    text_key = "text"
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
          seqio.preprocessors.tokenize,   # keeps 'targets_pretokenized' (byte budgets use it)
          seqio.preprocessors.append_eos,
      ],
      output_features={"targets": seqio.Feature(
          vocabulary=vocab_lib.get_vocabulary(data_cfg), add_eos=True, dtype=tf.int32)},
      metric_fns=[])
  return name
