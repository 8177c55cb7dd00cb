"""MixedModalData: image-caption, speech-transcript and text documents as packed mixed-modal batches.

Sources of image-caption pairs: 'generated' (scenes of shapes with captions, offline, the default), 'files'
(a folder of images with `captions.jsonl`) or 'tfds' (a prepared image-caption dataset). Audio documents are
always the synthetic speech of `audio.py`; text-only documents are chunks of the embedded corpus of
`common.data`. Images and clips are tokenised once when a split is built; the packed rows are cached under
`data.cache_dir`, and the batch at a data position is a pure function of (seed, position), as in LMData.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Iterator

import ml_collections
import numpy as np

from common.data import DEFAULT_CACHE_DIR, DataError, corpus
from common.data.epochs import EpochOrder
from common.data.mixed_modal import audio, documents, scenes
from common.data.mixed_modal.vocab import IMAGE, MODALITIES, MixedVocab

CACHE_VERSION = 1
SETTINGS = ("chameleon", "transfusion")
SOURCES = ("generated", "files", "tfds")
SPLITS = ("train", "validation")
_ENCODE_CHUNK = 256  # images per tokenizer call


def mixed_modal_data_config() -> ml_collections.ConfigDict:
  """The `data.*` block of the mixed-modal trainers (MoT, MoMa)."""
  return ml_collections.ConfigDict(dict(
      setting="chameleon",            # 'chameleon' (discrete image tokens) | 'transfusion' (patches + diffusion)
      modalities=("text", "image"),   # add "audio" for the speech setting (chameleon only)
      seq_len=256,
      source="generated",             # 'generated' | 'files' | 'tfds'
      path="",                        # source='files': a folder with images and captions.jsonl
      tfds_name="",                   # source='tfds': a prepared image-caption dataset
      tfds_data_dir="",
      tfds_train_split="train",
      tfds_eval_split="validation",
      image_key="image",              # tfds features ('a/b' for nested ones)
      caption_key="caption",
      image_tokenizer="",             # workdir of a trained VQ tokenizer; '' = the cached default
      image_size=32,
      patch_size=4,                   # transfusion patches
      audio_codebook=64,              # k-means codes of the default audio tokenizer
      n_train_docs=4000,
      n_eval_docs=400,
      text_fraction=0.2,              # share of text-only documents
      validation_fraction=0.1,        # share of a 'files' folder held out (stable hash of the image path)
      cache_dir=DEFAULT_CACHE_DIR,
      seed=0,                         # of the generated content (the batch order follows train.seed)
  ))


def validate_data_config(c) -> None:
  """Cheap checks of `data.*`, each failure a DataError naming its key."""
  if c.setting not in SETTINGS:
    raise DataError(f"data.setting={c.setting!r} is unknown (expected one of {SETTINGS})")
  mods = tuple(c.modalities)
  if "text" not in mods or not set(mods) <= set(MODALITIES) or len(set(mods)) != len(mods) or len(mods) < 2:
    raise DataError(f"data.modalities={mods!r}: text and one or more of 'image', 'audio', no repeats")
  if c.setting == "transfusion" and mods != ("text", "image"):
    raise DataError(f"data.modalities={mods!r}: the transfusion setting is text and image only")
  if c.source not in SOURCES:
    raise DataError(f"data.source={c.source!r} is unknown (expected one of {SOURCES})")
  if c.source == "tfds" and not c.tfds_name:
    raise DataError("data.tfds_name is empty: data.source='tfds' needs a prepared dataset name")
  if c.source == "files" and not c.path:
    raise DataError("data.path is empty: data.source='files' needs a folder with captions.jsonl")
  if c.image_size < scenes.MIN_IMAGE_SIZE:
    raise DataError(f"data.image_size={c.image_size} must be at least {scenes.MIN_IMAGE_SIZE}")
  if c.patch_size <= 0 or c.image_size % c.patch_size:
    raise DataError(f"data.patch_size={c.patch_size} must divide data.image_size={c.image_size}")
  if not 0.0 <= c.text_fraction < 1.0:
    raise DataError(f"data.text_fraction={c.text_fraction} must be in [0, 1)")
  if not 0.0 <= c.validation_fraction < 1.0:
    raise DataError(f"data.validation_fraction={c.validation_fraction} must be in [0, 1)")
  for key in ("n_train_docs", "n_eval_docs", "seq_len", "audio_codebook"):
    if c[key] <= 0:
      raise DataError(f"data.{key}={c[key]} must be positive")
  if not c.cache_dir:
    raise DataError("data.cache_dir is empty")


def _log(msg: str):
  print(f"[mixed_modal] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- image-caption pairs of each source

def _read_image(path: str, size: int) -> np.ndarray:
  """f32 [size, size, 3] in [-1, 1] from an image file (PIL when installed, else matplotlib for PNG)."""
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(path) as im:
      pixels = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255.0
  except ImportError:
    import matplotlib.image  # pylint: disable=g-import-not-at-top
    raw = np.asarray(matplotlib.image.imread(path), np.float32)
    raw = raw / 255.0 if raw.max() > 1.0 else raw
    raw = np.repeat(raw[..., None], 3, -1) if raw.ndim == 2 else raw[..., :3]
    rows = (np.arange(size) * raw.shape[0] / size).astype(int)
    cols = (np.arange(size) * raw.shape[1] / size).astype(int)
    pixels = raw[rows][:, cols]
  return pixels * 2.0 - 1.0


def _file_records(c) -> tuple[str, list[dict]]:
  root = os.path.expanduser(c.path)
  if not os.path.isdir(root):
    raise DataError(f"data.path={c.path!r} is not a folder (data.source='files' needs images + captions.jsonl)")
  listing = os.path.join(root, "captions.jsonl")
  if not os.path.isfile(listing):
    raise DataError(f"data.path={c.path!r} has no captions.jsonl")
  records = []
  with open(listing, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        records.append({"image": str(rec["image"]), "caption": str(rec["caption"])})
      except (ValueError, KeyError, TypeError):
        raise DataError(f"data.path={c.path!r}: captions.jsonl line {line_no} is not "
                        '{"image": ..., "caption": ...}') from None
      if not os.path.isfile(os.path.join(root, records[-1]["image"])):
        raise DataError(f"data.path={c.path!r}: captions.jsonl line {line_no} names a missing image "
                        f"{records[-1]['image']!r}")
  if not records:
    raise DataError(f"data.path={c.path!r}: captions.jsonl lists no image")
  return root, records


def _file_pairs(c, split: str, limit: int) -> tuple[np.ndarray, list[str]]:
  root, records = _file_records(c)
  chosen = set(corpus.split_files(sorted({r["image"] for r in records}), float(c.validation_fraction))[split])
  records = [r for r in records if r["image"] in chosen][:limit]
  images = np.stack([_read_image(os.path.join(root, r["image"]), c.image_size) for r in records])
  return images, [r["caption"] for r in records]


def _feature(example: dict, key: str):
  for part in key.split("/"):
    example = example[part]
  return example


def _tfds_pairs(c, split: str, limit: int) -> tuple[np.ndarray, list[str]]:
  from common.data._tf import import_tfds  # pylint: disable=g-import-not-at-top
  from common.data.tasks import check_tfds_prepared  # pylint: disable=g-import-not-at-top
  tfds = import_tfds()
  builder = check_tfds_prepared(c)
  features = builder.info.features
  for name in ("image_key", "caption_key"):
    if c[name].split("/")[0] not in features:
      raise DataError(f"data.{name}={c[name]!r} is not a feature of {c.tfds_name!r} "
                      f"(it has {', '.join(sorted(features.keys()))})")
  split_name = c.tfds_train_split if split == "train" else c.tfds_eval_split
  if split_name not in builder.info.splits:
    key = "tfds_train_split" if split == "train" else "tfds_eval_split"
    raise DataError(f"data.{key}={split_name!r} is not a split of {c.tfds_name!r}")
  images, captions = [], []
  from PIL import Image  # pylint: disable=g-import-not-at-top  (tfds depends on it)
  for ex in tfds.as_numpy(builder.as_dataset(split=split_name, shuffle_files=False).take(limit)):
    pixels = np.asarray(_feature(ex, c.image_key))
    pixels = np.repeat(pixels, 3, -1) if pixels.shape[-1] == 1 else pixels[..., :3]
    resized = Image.fromarray(pixels.astype(np.uint8)).resize((c.image_size, c.image_size), Image.BILINEAR)
    images.append(np.asarray(resized, np.float32) / 127.5 - 1.0)
    text = np.asarray(_feature(ex, c.caption_key)).reshape(-1)[0]  # several captions: the first
    captions.append(text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text))
  if not images:
    raise DataError(f"data.tfds_name={c.tfds_name!r}: split {split_name!r} is empty")
  return np.stack(images), captions


def _pairs(c, split: str, limit: int) -> tuple[np.ndarray, list[str]]:
  """(images f32 [N, H, W, 3] in [-1, 1], captions), N <= limit."""
  if c.source == "generated":
    sampled = scenes.sample_scenes(limit, _split_seed(c, split, 1), c.image_size)
    return scenes.render_batch(sampled, c.image_size), [scenes.caption(s) for s in sampled]
  if c.source == "files":
    return _file_pairs(c, split, limit)
  return _tfds_pairs(c, split, limit)


def _split_seed(c, split: str, purpose: int) -> int:
  return int(np.random.SeedSequence((int(c.seed), SPLITS.index(split), purpose)).generate_state(1)[0])


def text_chunks(n: int, max_bytes: int, split: str, seed: int) -> list[bytes]:
  """`n` line-aligned chunks (max_bytes // 4 .. max_bytes bytes) of the embedded corpus' `split` files."""
  root, rels = corpus.embedded_files()
  rels = sorted(corpus.split_files(rels, 0.03)[split], key=corpus.hash_score)
  rng = np.random.default_rng(seed)
  out: list[bytes] = []
  for rel in rels:
    if len(out) >= n:
      break
    with open(os.path.join(root, rel), "rb") as f:
      raw = f.read()
    for _ in range(min(n - len(out), len(raw) // max_bytes)):
      start = raw.find(b"\n", int(rng.integers(len(raw) - max_bytes))) + 1
      chunk = raw[start:start + int(rng.integers(max_bytes // 4, max_bytes + 1))]
      if chunk.strip():
        out.append(chunk)
  return out


# ---------------------------------------------------------------- documents of a split

def _plan(c, split: str) -> dict[str, int]:
  """Documents of each kind: text_fraction of them text, the rest shared evenly by the other modalities."""
  n = int(c.n_train_docs if split == "train" else c.n_eval_docs)
  kinds = [m for m in c.modalities if m != "text"]
  n_text = int(round(n * float(c.text_fraction)))
  plan = {"text": n_text}
  for i, kind in enumerate(kinds):
    plan[kind] = (n - n_text) // len(kinds) + (i < (n - n_text) % len(kinds))
  return plan


def _fit_caption(text: str, room: int) -> str:
  """The caption cut to `room` bytes (a whole character at the end), so its document fits one row."""
  return text.encode("utf-8")[:room].decode("utf-8", "ignore")


def build_split(c, split: str, vocab: MixedVocab, image_tokenizer, audio_tokenizer) -> dict[str, np.ndarray]:
  """Packed rows of `split` (documents.pack_rows) and, for Transfusion, `patch_table` [patches, dim]."""
  plan = _plan(c, split)
  seq_len = int(c.seq_len)
  rng = np.random.default_rng(_split_seed(c, split, 0))
  docs: list[np.ndarray] = []
  patch_index: list[np.ndarray] = []
  patch_table = np.zeros((0, 3 * c.patch_size**2), np.float32)

  def add(doc: np.ndarray, patches_at: np.ndarray | None = None):
    docs.append(doc)
    patch_index.append(np.full(len(doc), -1, np.int32) if patches_at is None else patches_at)

  if plan.get("image"):
    images, captions = _pairs(c, split, plan["image"])
    if c.setting == "transfusion":
      patches = documents.patchify(images, c.patch_size)
      per_image = patches.shape[1]
      patch_table = patches.reshape(-1, patches.shape[-1])
      codes = np.zeros((len(images), per_image), np.int32)  # the placeholder vocab.image_offset
    else:
      codes = np.concatenate([np.asarray(image_tokenizer.encode(images[i:i + _ENCODE_CHUNK]), np.int32)
                              for i in range(0, len(images), _ENCODE_CHUNK)])
      per_image = codes.shape[1]
    room = seq_len - per_image - 3
    if room < 1:
      raise DataError(f"data.seq_len={seq_len} is too short for an image of {per_image} tokens")
    for i, (image_codes, text) in enumerate(zip(codes, captions)):
      if c.source == "generated" and len(text.encode("utf-8")) > room:  # a cut caption would misdescribe
        raise DataError(f"data.seq_len={seq_len} is too short for a caption of {len(text)} bytes and an "
                        f"image of {per_image} tokens")
      text = _fit_caption(text, room)  # a user's long caption is cut, as long text is in any LM
      parts = [("text", text), ("image", image_codes)]
      doc = documents.build_document(vocab, parts if rng.integers(2) else parts[::-1])
      at = None
      if c.setting == "transfusion":
        at = np.full(len(doc), -1, np.int32)
        at[vocab.modality_of(doc) == IMAGE] = i * per_image + np.arange(per_image)
      add(doc, at)
  if plan.get("audio"):
    transcripts = audio.sample_transcripts(plan["audio"], rng)
    clips = [audio.speak(t, rng) for t in transcripts]
    for codes, text in zip(audio_tokenizer.encode(clips), transcripts):
      parts = [("audio", codes), ("text", text)]
      doc = documents.build_document(vocab, parts if rng.integers(2) else parts[::-1])
      if len(doc) > seq_len:
        raise DataError(f"data.seq_len={seq_len} is too short for a clip of {len(codes)} tokens and its "
                        f"transcript {text!r}")
      add(doc)
  for chunk in text_chunks(plan["text"], seq_len - 1, split, _split_seed(c, split, 2)):
    add(documents.build_document(vocab, [("text", chunk)]))
  order = rng.permutation(len(docs))  # interleave the kinds before packing
  rows = documents.pack_rows([docs[i] for i in order], seq_len, [patch_index[i] for i in order])
  rows["patch_table"] = patch_table
  rows["num_docs"] = np.asarray(len(docs), np.int64)
  return rows


# ---------------------------------------------------------------- cache and batches

def _fingerprints(c, image_tokenizer, audio_tokenizer) -> dict[str, str]:
  """What the tokenizers contribute to the cache key: the codes of fixed probe scenes (any tokenizer object
  qualifies, trained or stand-in) and the audio codebook itself."""
  out = {}
  if image_tokenizer is not None:
    probe = scenes.render_batch(scenes.sample_scenes(4, 12345, c.image_size), c.image_size)
    codes = np.asarray(image_tokenizer.encode(probe), np.int32)
    out["image"] = hashlib.sha1(codes.tobytes() + str(image_tokenizer.codebook_size).encode()).hexdigest()
  if audio_tokenizer is not None:
    out["audio"] = hashlib.sha1(np.asarray(audio_tokenizer.centroids, np.float32).tobytes()).hexdigest()
  return out


def cache_key(c, fingerprints: dict[str, str]) -> str:
  keys = {k: c[k] for k in ("setting", "seq_len", "source", "image_size", "patch_size", "n_train_docs",
                            "n_eval_docs", "text_fraction", "seed")}
  keys.update(version=CACHE_VERSION, modalities=list(c.modalities), corpus=corpus.stdlib_root(), **fingerprints)
  if c.source == "files":
    root, records = _file_records(c)
    with open(os.path.join(root, "captions.jsonl"), "rb") as f:
      keys["captions"] = hashlib.sha1(f.read()).hexdigest()
    keys.update(path=os.path.abspath(root), validation_fraction=c.validation_fraction,
                images=corpus.fingerprint(root, sorted({r["image"] for r in records})))
  elif c.source == "tfds":
    keys.update({k: c[k] for k in ("tfds_name", "tfds_train_split", "tfds_eval_split", "image_key",
                                   "caption_key")})
    keys["tfds_data_dir"] = os.path.abspath(os.path.expanduser(c.tfds_data_dir)) if c.tfds_data_dir else ""
  return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:20]


def _check_image_tokenizer(c, given):
  """Discrete image tokens need a tokenizer from the caller (common.recipes.image_tokenizer.for_data reads
  data.image_tokenizer or trains the default); the data never trains one."""
  if c.setting != "chameleon" or "image" not in c.modalities:
    return None
  if given is None:
    raise DataError("data.image_tokenizer: the chameleon setting with images needs an image tokenizer; build "
                    "it with common.recipes.image_tokenizer.for_data(cfg.data) and pass image_tokenizer=")
  return given


def _resolve_audio_tokenizer(c, injected):
  if "audio" not in c.modalities:
    return None
  return injected if injected is not None else audio.default_audio_tokenizer(
      c.cache_dir, int(c.audio_codebook), seed=int(c.seed))


class MixedModalData:
  """Deterministic mixed-modal batches with the duck interface of `common.data.LMData`."""

  def __init__(self, data_cfg, *, batch_size: int, seed: int, image_tokenizer=None, audio_tokenizer=None):
    if batch_size <= 0:
      raise DataError(f"batch size must be positive, got {batch_size}")
    c = self.data_cfg = ml_collections.ConfigDict(mixed_modal_data_config().to_dict() | dict(data_cfg))
    validate_data_config(c)
    self.batch_size, self.seed, self.seq_len, self.setting = int(batch_size), int(seed), int(c.seq_len), c.setting
    self.image_tokenizer = _check_image_tokenizer(c, image_tokenizer)
    self.audio_tokenizer = _resolve_audio_tokenizer(c, audio_tokenizer)
    image_codebook = (self.image_tokenizer.codebook_size if self.image_tokenizer is not None
                      else int("image" in c.modalities))  # transfusion: one placeholder id
    audio_codebook = self.audio_tokenizer.codebook_size if self.audio_tokenizer is not None else 0
    self.vocab = MixedVocab(image_codebook, audio_codebook)
    self.vocab_size = self.vocab.size
    self._train, self._eval = self._load(c)
    self.patch_table = self._train["patch_table"]
    self._eval_patch_table = self._eval["patch_table"]
    self.num_train_rows = int(self._train["targets"].shape[0])
    self.num_eval_rows = int(self._eval["targets"].shape[0])
    if self.num_train_rows == 0 or self.num_eval_rows == 0:
      raise DataError(f"data.source={c.source!r} produced no documents for a split")
    self._order = EpochOrder(self.num_train_rows, self.seed)

  def _load(self, c) -> tuple[dict, dict]:
    key = cache_key(c, _fingerprints(c, self.image_tokenizer, self.audio_tokenizer))
    cache_dir = os.path.expanduser(c.cache_dir)
    out = []
    for split in SPLITS:
      path = os.path.join(cache_dir, f"mm-{c.source}-{key}-{split}.npz")
      if not os.path.exists(path):
        start = time.time()
        rows = build_split(c, split, self.vocab, self.image_tokenizer, self.audio_tokenizer)
        _log(f"built {split}: {int(rows['num_docs']):,} documents -> {len(rows['targets']):,} rows of "
             f"{c.seq_len} ({time.time() - start:.1f}s), cached in {cache_dir}")
        from common.data.pipeline import _save_atomic  # pylint: disable=g-import-not-at-top
        _save_atomic(path, rows)
      with np.load(path) as z:
        out.append({k: z[k] for k in z.files})
    return out[0], out[1]

  def train_rows_at(self, position: int, count: int) -> np.ndarray:
    """Row indices position .. position+count-1 of the stream of epochs, each a permutation by
    rng((seed, epoch))."""
    return self._order.rows_at(position, count)

  def train_batch(self, position: int) -> dict[str, np.ndarray]:
    return documents.make_batch(self._train, self.train_rows_at(position, self.batch_size), self.vocab,
                                self.setting, self.patch_table)

  def num_eval_batches(self) -> int:
    return math.ceil(self.num_eval_rows / self.batch_size)

  def eval_batches(self, max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Validation rows in order; the last batch is padded with all-padding rows (loss_mask 0)."""
    n = self.num_eval_batches()
    if max_batches and max_batches > 0:
      n = min(n, max_batches)
    pad = n * self.batch_size - self.num_eval_rows
    rows = self._eval
    if pad > 0:
      rows = {k: np.concatenate([rows[k], np.full((pad, self.seq_len), -1 if k == "patch_index" else 0,
                                                  np.int32)]) for k in documents.ROW_KEYS}
    for b in range(n):
      yield documents.make_batch(rows, np.arange(b * self.batch_size, (b + 1) * self.batch_size),
                                 self.vocab, self.setting, self._eval_patch_table)
