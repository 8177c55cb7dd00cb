"""LMData: packed rows cached once (raw int32 files, memory-mapped: a split of any size is neither built nor
read whole in RAM), then batches as a pure function of (seed, position).

The trainer checkpoints only the data position (rows consumed); because the batch at a position does
not depend on history, a resumed or multi-process run sees exactly the same data as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Iterator

import numpy as np

from common.data import DataError, corpus, packing, tasks, vocab as vocab_lib, with_defaults
from common.data.epochs import EpochOrder

CACHE_VERSION = 2
_ROW_KEYS = ("targets", "segment_ids", "positions")
SPLITS = ("train", "validation")


def _log(msg: str):
  print(f"[common.data] {msg}", file=sys.stderr, flush=True)


def cache_key(data_cfg) -> str:
  """Hash of everything the packed rows depend on: files (with sizes and mtimes) or the tfds name,
  vocabulary content, seq_len and byte budgets. Validates the config (DataError) without TensorFlow."""
  key = dict(version=CACHE_VERSION, source=tasks.source_keys(data_cfg),
             vocab=vocab_lib.vocab_fingerprint(data_cfg), seq_len=int(data_cfg.seq_len),
             max_train_bytes=int(data_cfg.max_train_bytes or 0),
             max_eval_bytes=int(data_cfg.max_eval_bytes or 0))
  if data_cfg.source != "tfds":
    for split in SPLITS:
      root, rels = corpus.list_documents(data_cfg, split)
      key[split] = [root, corpus.fingerprint(root, rels)]
  return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _build_split(data_cfg, name: str, split: str, path: str, vocab_size: int, shard: tuple[int, int] = (0, 1)):
  """Tokenizes the split (of a training shard: its files, or its part of the tfds files through seqio's
  shard_info) with the seqio task and packs it into the cache folder `path`, a chunk of rows at a time (tfds
  byte budgets apply here, on the text, split evenly over the shards)."""
  from common.data._tf import import_seqio  # pylint: disable=g-import-not-at-top
  seqio = import_seqio()
  shard_info = seqio.ShardInfo(*shard) if data_cfg.source == "tfds" and shard[1] > 1 else None
  ds = seqio.get_mixture_or_task(name).get_dataset(
      sequence_length=None, split=split, shuffle=False, num_epochs=1, trim_output_features=False,
      shard_info=shard_info)
  budget = int((data_cfg.max_train_bytes if split == "train" else data_cfg.max_eval_bytes) or 0) // shard[1]
  if data_cfg.source != "tfds":
    budget = 0  # file lists are already cut to the budget by corpus.limit_bytes
  stats = {"docs": 0, "bytes": 0}

  def docs():
    for ex in ds.as_numpy_iterator():
      if budget and stats["bytes"] >= budget:
        return
      stats["docs"] += 1
      stats["bytes"] += len(ex["targets_pretokenized"])
      yield ex["targets"]

  start = time.time()
  seq_len = int(data_cfg.seq_len)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
  try:
    files = {k: open(os.path.join(tmp, f"{k}.i32"), "wb") for k in _ROW_KEYS}
    rows = 0
    with contextlib.ExitStack() as stack:
      for f in files.values():
        stack.enter_context(f)
      for chunk in packing.pack_chunks(docs(), seq_len):
        for k in _ROW_KEYS:
          files[k].write(np.ascontiguousarray(chunk[k], np.int32).tobytes())
        rows += len(chunk["targets"])
    meta = dict(version=CACHE_VERSION, rows=rows, seq_len=seq_len, num_bytes=stats["bytes"], vocab_size=vocab_size)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f)
    for name_ in os.listdir(tmp):
      os.chmod(os.path.join(tmp, name_), 0o644)  # a shared cache must be readable by other users
    os.chmod(tmp, 0o755)
    try:
      os.rename(tmp, path)  # atomic; readers (other processes) never see a partial folder
    except OSError:
      if not os.path.exists(os.path.join(path, "meta.json")):
        raise
      shutil.rmtree(tmp)  # another process finished the same split first
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  where = f"{split} (shard {shard[0]} of {shard[1]})" if shard[1] > 1 else split
  _log(f"packed {where}: {stats['docs']:,} documents, {stats['bytes']:,} bytes -> "
       f"{rows:,} rows of {seq_len} ({time.time() - start:.1f}s)")


def _open_split(path: str) -> dict[str, np.ndarray]:
  """The cached rows of a split, memory-mapped read-only, with `num_bytes` and `vocab_size`."""
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  shape = (int(meta["rows"]), int(meta["seq_len"]))
  out = {k: np.memmap(os.path.join(path, f"{k}.i32"), np.int32, "r", shape=shape) if shape[0] else
         np.zeros(shape, np.int32) for k in _ROW_KEYS}
  out["num_bytes"] = np.asarray(meta["num_bytes"], np.int64)
  out["vocab_size"] = np.asarray(meta["vocab_size"], np.int64)
  return out


def _save_atomic(path: str, arrays: dict[str, np.ndarray]):
  """tmp + rename in the same directory: readers (other processes) never see a partial file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(buf.getvalue())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable by other users
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_rows(data_cfg, train_shard: tuple[int, int] = (0, 1)) -> tuple[dict[str, dict[str, np.ndarray]], int]:
  """({split: packed arrays}, vocab_size), from the cache or built once and cached; "train" holds the rows of
  training shard (index, count) only, "validation" the whole split."""
  data_cfg = with_defaults(data_cfg)
  if int(data_cfg.seq_len) <= 0:
    raise DataError(f"data.seq_len={data_cfg.seq_len} must be positive")
  key = cache_key(data_cfg)
  cache_dir = os.path.expanduser(data_cfg.cache_dir or "")
  if not cache_dir:
    raise DataError("data.cache_dir is empty")
  paths = {s: os.path.join(cache_dir, f"lm-{data_cfg.source}-{key}-{s}") for s in SPLITS}
  if train_shard[1] > 1:
    paths["train"] += "-shard{}of{}".format(*train_shard)
  missing = [s for s in SPLITS if not os.path.exists(os.path.join(paths[s], "meta.json"))]
  if missing:
    name = tasks.register_lm_task(data_cfg, train_shard)
    _log(f"building the packed cache under {cache_dir} (once for this config)")
    vocab_size = vocab_lib.get_vocabulary(data_cfg).vocab_size
    for split in missing:
      _build_split(data_cfg, name, split, paths[split], vocab_size, train_shard if split == "train" else (0, 1))
  out = {split: _open_split(paths[split]) for split in SPLITS}
  return out, int(out["train"]["vocab_size"])


class LMData:
  """Deterministic batches: the batch at a data position is a pure function of (seed, position, data.shards).

  With `data.shards` = n > 1 (0: one per process) the training documents are split into n shards (files
  round-robin; a tfds split by seqio's shard_info), each packed and cached alone, each with its own epoch
  order; the global batch is shard 0's rows, then shard 1's, ...: batch_size / n rows from each. A process
  reads, packs and batches only the shards it owns (an equal run of them): `process_rows` is the slice of
  the global batch its `train_batch` returns, which the loop assembles with
  `jax.make_array_from_process_local_data`. The content depends on n, not on the process count, so one
  process with data.shards=2 trains exactly like two processes."""

  def __init__(self, data_cfg, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    if batch_size <= 0:
      raise DataError(f"batch size must be positive, got {batch_size}")
    self.data_cfg = data_cfg = with_defaults(data_cfg)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.seq_len = int(data_cfg.seq_len)
    shards = int(data_cfg.get("shards", 0)) or process_count
    if shards < 0 or shards % process_count:
      raise DataError(f"data.shards={data_cfg.shards} must be a multiple of the process count {process_count} "
                      "(0: one shard per process)")
    if self.batch_size % shards:
      raise DataError(f"data.shards={shards} must divide the batch size {self.batch_size}")
    per_process = shards // process_count
    self.shards = shards
    self.owned = range(process_index * per_process, (process_index + 1) * per_process)
    self.process_rows = slice(process_index * self.batch_size // process_count,
                              (process_index + 1) * self.batch_size // process_count)
    self._train, self._orders = [], []
    for index in self.owned:
      rows, self.vocab_size = load_rows(data_cfg, (index, shards))
      self._train.append(rows["train"])
      n = int(rows["train"]["targets"].shape[0])
      if n == 0:
        raise DataError(f"data.source={data_cfg.source!r} produced no training text" +
                        (f" for shard {index} of data.shards={shards} (fewer files than shards?)" if shards > 1
                         else ""))
      self._orders.append(EpochOrder(n, self.seed, stream=index if shards > 1 else None))
    self._eval = rows["validation"]
    self.num_train_rows = sum(int(t["targets"].shape[0]) for t in self._train)
    self.num_eval_rows = int(self._eval["targets"].shape[0])
    self.train_bytes = sum(int(t["num_bytes"]) for t in self._train)  # text bytes behind the rows (bits/byte)
    self.eval_bytes = int(self._eval["num_bytes"])
    self._vocab = None

  @property
  def vocab(self):
    """The seqio vocabulary (imported lazily: a cached start does not need seqio/TensorFlow)."""
    if self._vocab is None:
      self._vocab = vocab_lib.get_vocabulary(self.data_cfg)
    return self._vocab

  def train_rows_at(self, position: int, count: int) -> np.ndarray:
    """Indices of packed train rows position .. position+count-1 of the infinite epoch stream (one shard)."""
    if self.shards > 1:
      raise ValueError("train_rows_at is defined for one data shard (data.shards=1)")
    return self._orders[0].rows_at(position, count)

  @staticmethod
  def _batch(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    targets = arrays["targets"][rows]
    segment_ids = arrays["segment_ids"][rows]
    positions = arrays["positions"][rows]
    return {"inputs": packing.make_inputs(targets, positions), "targets": targets,
            "segment_ids": segment_ids, "positions": positions,
            "loss_mask": (segment_ids > 0).astype(np.float32)}

  def train_batch(self, position: int) -> dict[str, np.ndarray]:
    """The rows `process_rows` of the global batch at data position `position` (a multiple of the batch size):
    from each owned shard its rows position/n .. + batch_size/n of its epoch stream, each epoch a permutation
    by rng((seed, epoch)) (rng((seed, epoch, shard)) when sharded)."""
    per_shard = self.batch_size // self.shards
    parts = [self._batch(rows, order.rows_at(position // self.shards, per_shard))
             for rows, order in zip(self._train, self._orders)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]

  def num_eval_batches(self) -> int:
    return math.ceil(self.num_eval_rows / self.batch_size)

  def eval_batches(self, max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Validation rows in order; the last batch is padded with all-padding rows (loss_mask 0).
    max_batches <= 0 means all of them."""
    n = self.num_eval_batches()
    if max_batches and max_batches > 0:
      n = min(n, max_batches)
    padded = {k: np.concatenate([self._eval[k], np.zeros(
        (n * self.batch_size - self.num_eval_rows, self.seq_len), np.int32)])
              if n * self.batch_size > self.num_eval_rows else self._eval[k] for k in _ROW_KEYS}
    for b in range(n):
      yield self._batch(padded, np.arange(b * self.batch_size, (b + 1) * self.batch_size))
