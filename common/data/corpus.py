"""Document lists: the embedded corpus (this Python's standard library) and user globs.

The embedded corpus exists on every machine that can run the code, so every trainer works offline with
no download. Train/validation membership is a stable hash of each file's relative path, so the split
does not depend on the file system's listing order, on the machine, or on which other files exist.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig

from common.data import DataError

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                            "__pycache__"})
_EMBEDDED_SUFFIXES = (".py", ".txt", ".rst")
_GLOB_CHARS = frozenset("*?[")


def stdlib_root() -> str:
  return os.path.realpath(sysconfig.get_paths()["stdlib"])


def embedded_files() -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the standard library's sources and text files, tests excluded."""
  root = stdlib_root()
  rels = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
    for name in filenames:
      if name.endswith(_EMBEDDED_SUFFIXES):
        rels.append(os.path.relpath(os.path.join(dirpath, name), root))
  return root, sorted(rels)


def user_files(pattern: str) -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the files matched by `data.path`; no match is a DataError."""
  if not pattern:
    raise DataError("data.path is empty: data.source='files' needs a glob of text files")
  expanded = os.path.expanduser(pattern)
  matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
  if not matches:
    raise DataError(f"data.path={pattern!r} matches no file")
  # Root = the pattern's literal prefix, so paths (and hence the split) do not depend on the cwd.
  parts = expanded.split(os.sep)
  literal = []
  for part in parts[:-1]:
    if _GLOB_CHARS & set(part):
      break
    literal.append(part)
  root = os.path.abspath(os.sep.join(literal) or ".")
  return root, sorted(os.path.relpath(os.path.abspath(p), root) for p in matches)


def hash_score(rel: str) -> float:
  """A stable uniform number in [0, 1) for a relative path (sha1, independent of PYTHONHASHSEED)."""
  digest = hashlib.sha1(rel.replace(os.sep, "/").encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(rels: list[str], validation_fraction: float) -> dict[str, list[str]]:
  """Deterministic disjoint train/validation lists that together cover `rels` (both non-empty if
  there are at least two files; a single file serves both splits, as there is nothing else to hold out)."""
  val = [r for r in rels if hash_score(r) < validation_fraction]
  train = [r for r in rels if hash_score(r) >= validation_fraction]
  if len(rels) == 1:
    return {"train": list(rels), "validation": list(rels)}
  if not val and rels:   # too few files for the fraction: hold out the one with the lowest score
    val = [min(train, key=hash_score)]
    train = [r for r in train if r != val[0]]
  if not train and rels:
    train = [max(val, key=hash_score)]
    val = [r for r in val if r != train[0]]
  return {"train": train, "validation": val}


def limit_bytes(root: str, rels: list[str], max_bytes: int) -> list[str]:
  """The files kept under a byte budget (0 = all): taken in hash order, so a small budget still
  samples the whole corpus rather than its alphabetically first files; returned in sorted order.
  The file that crosses the budget is kept, so the result is never empty."""
  if not max_bytes or max_bytes <= 0:
    return list(rels)
  kept, total = [], 0
  for rel in sorted(rels, key=hash_score):
    if total >= max_bytes:
      break
    kept.append(rel)
    total += os.path.getsize(os.path.join(root, rel))
  return sorted(kept)


def list_documents(data_cfg, split: str) -> tuple[str, list[str]]:
  """(root, relative paths) of the documents of `split` for source 'embedded' or 'files'. Refused before any
  cache is built: training files without text, and a single file (nothing to hold out) unless
  `data.eval_on_train` says to evaluate on the training files."""
  if data_cfg.source == "embedded":
    root, rels = embedded_files()
  elif data_cfg.source == "files":
    root, rels = user_files(data_cfg.path)
  else:
    raise DataError(f"data.source={data_cfg.source!r} has no file list (expected 'embedded' or 'files')")
  if split not in ("train", "validation"):
    raise DataError(f"unknown split {split!r} (expected 'train' or 'validation')")
  frac = float(data_cfg.validation_fraction)
  if not 0.0 <= frac < 1.0:
    raise DataError(f"data.validation_fraction={frac} must be in [0, 1)")
  eval_on_train = bool(data_cfg.get("eval_on_train", False))
  chosen = rels if eval_on_train or len(rels) == 1 else split_files(rels, frac)[split]
  if data_cfg.source == "files" and split == "train" and not any(
      os.path.getsize(os.path.join(root, rel)) for rel in chosen):
    raise DataError(f"config key 'data.path': {data_cfg.path!r} gives no training text (empty files)")
  if data_cfg.source == "files" and len(rels) == 1 and not eval_on_train:
    raise DataError(f"config key 'data.path': {data_cfg.path!r} matches one file, which cannot be both trained "
                    "on and held out for validation; add files, or set data.eval_on_train=True to evaluate on it")
  limit = data_cfg.max_train_bytes if split == "train" else data_cfg.max_eval_bytes
  return root, limit_bytes(root, chosen, int(limit or 0))


def shard_of(rels: list[str], index: int, count: int) -> list[str]:
  """The files of data shard `index` of `count`: every count-th from `index` (sorted input, so the shards are
  disjoint, cover the list, and differ in size by at most one file)."""
  return list(rels[index::count])


def read_text(path: str) -> str:
  """File text as UTF-8 (undecodable bytes replaced, so one odd file cannot stop training)."""
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def fingerprint(root: str, rels: list[str]) -> list[tuple[str, int, int]]:
  """(path, size, mtime_ns) per file: what the packed cache key depends on."""
  out = []
  for rel in rels:
    st = os.stat(os.path.join(root, rel))
    out.append((rel, st.st_size, st.st_mtime_ns))
  return out
