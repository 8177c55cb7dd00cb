"""Scores a trained mixed-modal run the way the MoT paper scores image generation and captioning (Liang et al.
2024, arXiv 2411.04996, sec. 3.2-3.3: image quality of captioned generations, and captioning), in miniature.

The generated scenes (`common.data.mixed_modal.scenes`) are fully described by a few attributes, so the
paper's learned image-quality metrics have an exact stand-in: an `AttributeClassifier` (a small conv net) trained
on rendered scenes reads the attributes of the first shape (row-major over the 3x3 grid) back from pixels; an
image generated from a caption is correct on an attribute when the classifier reads the caption's value. The
other way, a caption generated from an image is parsed back into attributes (`parse_caption`) and compared with
the scene's. Both accuracies are per attribute (shape, colour, size, position).

Generation: Chameleon samples the image tokens autoregressively after `caption <boi>` (temperature, top-k) and
decodes them with the run's VQ tokenizer; Transfusion denoises the image patches (`mot.transfusion.sample_images`,
optionally with classifier-free guidance).
Captions are greedy text after `<boi> image <eoi>`. Decoding recomputes the whole fixed-length row at each step
(no KV cache): the rows are short (a caption and 64 image tokens) and one compilation serves every step.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from common.configs.base import base_config
from common.data.epochs import EpochOrder
from common.data.mixed_modal import scenes
from common.data.mixed_modal.vocab import EOS
from common.generate import Sampling, sample_tokens, until_stop_id
from common.tasks.base import Task
from common.train.loop import train_to_completion
from common.train.restore import load_run_model

ATTRIBUTES = scenes.ATTRIBUTES  # ("shape", "colour", "size", "position")
VALUES = {"shape": scenes.SHAPES, "colour": scenes.COLOUR_NAMES, "size": scenes.SIZES,
          "position": scenes.POSITIONS}
CLASSIFIER_DEFAULTS = dict(channels=(16, 32, 32), hidden=128, steps=2000, batch_size=64, learning_rate=3e-3,
                           n_train=6000, n_heldout=1000, seed=0)


# --------------------------------------------------------------------------------------- the classifier


class AttributeClassifier(nnx.Module):
  """Conv net: stride-1 stem, stride-2 stages, a hidden layer, one softmax head per attribute of the first
  shape. Exact rendering makes every attribute recoverable from pixels (scenes.py), so held-out accuracy
  should approach 100%; `train_classifier` reports it."""

  def __init__(self, channels=(16, 32, 32), hidden: int = 128, image_size: int = 32, *, rngs: nnx.Rngs):
    widths = (3,) + tuple(channels)
    self.convs = nnx.List([nnx.Conv(widths[i], widths[i + 1], (3, 3), strides=1 if i == 0 else 2, rngs=rngs)
                           for i in range(len(channels))])
    side = image_size
    for _ in channels[1:]:
      side = -(-side // 2)
    self.hidden = nnx.Linear(side * side * widths[-1], hidden, rngs=rngs)
    self.heads = nnx.Dict({a: nnx.Linear(hidden, len(VALUES[a]), rngs=rngs) for a in ATTRIBUTES})

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:  # [N, H, W, 3] -> {attribute: [N, classes]}
    x = images
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    x = jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return {a: self.heads[a](x) for a in ATTRIBUTES}


def first_shape_labels(scene_list) -> np.ndarray:
  """int32 [N, 4]: the attribute indices of each scene's first shape (ATTRIBUTES order)."""
  return scenes.attributes(scene_list)[:, 0, :]


def _scene_set(n: int, seed: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  sample = scenes.sample_scenes(n, seed, image_size)
  return scenes.render_batch(sample, image_size), first_shape_labels(sample)


def classifier_accuracy(model: AttributeClassifier, images: np.ndarray, labels: np.ndarray,
                        batch: int = 256) -> dict[str, float]:
  """Accuracy per attribute of `model` on images f32 [N, H, W, 3] with labels int32 [N, 4]."""
  predicted = predict_attributes(model, images, batch)
  return {a: float(np.mean(predicted[:, i] == labels[:, i])) for i, a in enumerate(ATTRIBUTES)}


def predict_attributes(model: AttributeClassifier, images: np.ndarray, batch: int = 256) -> np.ndarray:
  """int32 [N, 4]: the classifier's attribute indices (ATTRIBUTES order) for images f32 [N, H, W, 3]."""
  forward = nnx.jit(lambda m, x: jnp.stack([jnp.argmax(m(x)[a], -1) for a in ATTRIBUTES], -1))
  images = np.asarray(images, np.float32)
  out = [np.asarray(forward(model, images[i:i + batch])) for i in range(0, len(images), batch)]
  return np.concatenate(out).astype(np.int32) if out else np.zeros((0, len(ATTRIBUTES)), np.int32)


def classifier_config(image_size: int = 32, **overrides) -> ml_collections.ConfigDict:
  """The loop's config of the classifier at CLASSIFIER_DEFAULTS updated by `overrides`: Adam (no weight decay,
  no clipping), cosine decay to 5% without warmup, one checkpoint at the end, ten log lines."""
  h = dict(CLASSIFIER_DEFAULTS, **overrides)
  cfg = base_config()
  cfg.model = ml_collections.ConfigDict(dict(name="attribute_classifier", channels=tuple(h["channels"]),
                                             hidden=h["hidden"], image_size=image_size))
  cfg.data = ml_collections.ConfigDict(dict(n_train=h["n_train"], n_heldout=h["n_heldout"]))
  cfg.train.update(steps=h["steps"], batch_size=h["batch_size"], learning_rate=h["learning_rate"], seed=h["seed"],
                   b2=0.999, warmup_steps=0, min_learning_rate_ratio=0.05, weight_decay=0.0, grad_clip=0.0)
  cfg.checkpoint.update(every_steps=h["steps"], keep=1, async_save=False)
  cfg.log.every_steps = max(1, h["steps"] // 10)
  cfg.eval.every_steps = h["steps"]
  return cfg


class SceneData:
  """Rendered scenes and their first shape's labels as the loop's data: the pool in a seeded order per epoch."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int):
    self.images, self.labels, self.batch_size = images, labels, batch_size
    self.order = EpochOrder(len(images), seed)

  def train_batch(self, position: int) -> dict:
    rows = self.order.rows_at(position, self.batch_size)
    return dict(images=self.images[rows], labels=self.labels[rows])

  def eval_batches(self, n_batches: int):
    """None: `train_classifier` scores the held-out scenes per attribute once training is done."""
    return iter(())


def classifier_loss(model: AttributeClassifier, batch: dict):
  """Cross-entropy summed over the heads and the images, the images, and the correct reads per attribute
  (metrics.jsonl: `accuracy/<attribute>` of the step's batch)."""
  logits, labels = model(batch["images"]), batch["labels"]
  total = sum(optax.softmax_cross_entropy_with_integer_labels(logits[a], labels[:, i]).sum()
              for i, a in enumerate(ATTRIBUTES))
  correct = {f"accuracy/{a}": jnp.sum(jnp.argmax(logits[a], -1) == labels[:, i])
             for i, a in enumerate(ATTRIBUTES)}
  return total, jnp.float32(labels.shape[0]), correct


def build_classifier(cfg) -> AttributeClassifier:
  m = cfg.model
  return AttributeClassifier(tuple(m.channels), int(m.hidden), int(m.image_size), rngs=nnx.Rngs(int(cfg.train.seed)))


def classifier_task(cfg) -> Task:
  images, labels = _scene_set(int(cfg.data.n_train), 10_000 + int(cfg.train.seed), int(cfg.model.image_size))
  return Task(build_model=lambda: build_classifier(cfg), loss_fn=classifier_loss, train_flops_per_example=0.0,
              units_per_example=1, throughput_key="images_per_sec",
              data=SceneData(images, labels, batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed)))


def train_classifier(image_size: int = 32, workdir: str = "", **overrides) -> tuple[AttributeClassifier,
                                                                                    dict[str, float]]:
  """(classifier, held-out accuracy per attribute): trained on the shared loop in `workdir` (rerunning resumes;
  default: a temporary folder), minibatches of `n_train` rendered scenes, scored on `n_heldout` scenes of
  another seed."""
  cfg = classifier_config(image_size, **overrides)
  task = classifier_task(cfg)
  with contextlib.nullcontext(workdir) if workdir else tempfile.TemporaryDirectory() as folder:
    train_to_completion(cfg, folder, task, what="the attribute classifier", devices=jax.local_devices()[:1])
    model, _ = load_run_model(folder, cfg, task.build_model, key="cache_dir")
  heldout_images, heldout_labels = _scene_set(int(cfg.data.n_heldout), 20_000 + int(cfg.train.seed), image_size)
  return model, classifier_accuracy(model, heldout_images, heldout_labels)


DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "meta_papers_jax", "attribute_classifier")


def cached_classifier(cache_dir: str = "", image_size: int = 32,
                      **overrides) -> tuple[AttributeClassifier, dict[str, float]]:
  """The classifier at CLASSIFIER_DEFAULTS (updated by `overrides`), trained once into a run folder under
  `cache_dir` (keyed by a hash of its settings; a file lock makes concurrent first uses train once, and a
  run stopped by SIGTERM resumes), with its held-out accuracy."""
  cfg = classifier_config(image_size, **overrides)
  digest = hashlib.sha256(cfg.to_json(sort_keys=True).encode()).hexdigest()[:12]
  root = os.path.join(os.path.expanduser(cache_dir), "attribute_classifier") if cache_dir else \
      os.path.expanduser(DEFAULT_CACHE_DIR)
  path = os.path.join(root, f"classifier_{image_size}px_{digest}")
  os.makedirs(root, exist_ok=True)
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    scored = os.path.join(path, "heldout_accuracy.json")
    if os.path.exists(scored):
      with open(scored) as f:
        accuracy = json.load(f)
      model, _ = load_run_model(path, cfg, lambda: build_classifier(cfg), key="cache_dir")
      return model, accuracy
    print(f"[mot.evaluate] training the attribute classifier once into {path} ({cfg.train.steps} steps)",
          file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
      model, accuracy = train_classifier(image_size, path, **overrides)
    with open(scored, "w") as f:
      json.dump(accuracy, f)
  return model, accuracy


# ------------------------------------------------------------------------------------------- captions


def _place_phrases() -> dict[str, str]:
  """{phrase: position} as `scenes.caption` writes positions ('at the top left' -> 'top left'), read off
  one-shape captions so that the two can never disagree."""
  out = {}
  for position in scenes.POSITIONS:
    shape = scenes.Shape(scenes.SHAPES[0], scenes.COLOUR_NAMES[0], scenes.SIZES[0], position)
    text = scenes.caption(scenes.Scene((shape,), 0, False))
    prefix = f"a {shape.size} {shape.colour} {shape.shape} "
    out[text[len(prefix):]] = position
  return out


PLACES = _place_phrases()
_CLAUSE = re.compile(r"\ba (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+)(?: (?P<place>.*))?")


def parse_caption(text: str) -> dict[str, str | None]:
  """The attributes of the first shape a caption names ('a small red circle at the top left and ...'), None
  for each one the text does not state in the captions' grammar (a generated caption may be malformed)."""
  out: dict[str, str | None] = {a: None for a in ATTRIBUTES}
  match = _CLAUSE.search(text.split(" and ")[0])
  if match is None:
    return out
  for a in ("size", "colour", "shape"):
    if match[a] in VALUES[a]:
      out[a] = match[a]
  place = (match["place"] or "").strip()
  for phrase in sorted(PLACES, key=len, reverse=True):
    if place.startswith(phrase):
      out["position"] = PLACES[phrase]
      break
  return out


def caption_accuracy(generated: list[str], scene_list) -> dict[str, float]:
  """Per attribute, the share of generated captions whose first shape states the scene's first shape's value
  (an unparsable caption is wrong on every attribute)."""
  labels = first_shape_labels(scene_list)
  parsed = [parse_caption(text) for text in generated]
  return {a: float(np.mean([p[a] == VALUES[a][labels[k, i]] for k, p in enumerate(parsed)]))
          for i, a in enumerate(ATTRIBUTES)}


def image_accuracy(images: np.ndarray, scene_list, classifier: AttributeClassifier) -> dict[str, float]:
  """Per attribute, the share of images (generated from the captions of `scene_list`) on which the classifier
  reads the caption's first-shape value."""
  labels, predicted = first_shape_labels(scene_list), predict_attributes(classifier, images)
  return {a: float(np.mean(predicted[:, i] == labels[:, i])) for i, a in enumerate(ATTRIBUTES)}


# ----------------------------------------------------------------------------------------- generation


def _is_transfusion(model) -> bool:
  return model.__class__.__name__ == "TransfusionLM"


def left_padded(prompts: list[np.ndarray], n_new: int) -> dict[str, np.ndarray]:
  """Rows of each prompt (int ids, BOS 0 first, as in training) left-padded to one length, then `n_new`
  slots: `tokens`, `positions` (0 at the prompt's first id), `segment_ids` (0 on the padding, which nothing
  attends to) and `start` (the first slot), so one compiled step serves prompts of any lengths."""
  width = max(len(p) for p in prompts)
  length = width + n_new
  tokens = np.zeros((len(prompts), length), np.int32)
  positions = np.zeros_like(tokens)
  segment_ids = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    first = width - len(p)
    tokens[i, first:width] = p
    segment_ids[i, first:] = 1
    positions[i, first:] = np.arange(length - first)
  return dict(tokens=tokens, positions=positions, segment_ids=segment_ids, start=width)


def sample_continuations(model, vocab, rows: dict[str, np.ndarray], n_new: int, *, lo: int, hi: int,
                         temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> np.ndarray:
  """int32 [B, n_new]: ids in [lo, hi) sampled one at a time after `rows` (from `left_padded`; Transfusion
  rows also carry `image_ids` and clean `patches`, seen at diffusion timestep 0), chosen by the shared
  `common.generate.sample_tokens`: greedy at temperature 0, else softmax(logits / temperature) over the `top_k`
  most likely ids (0: all). The whole fixed-length row is
  recomputed at each step inside one `fori_loop`, the modality of each id read from `vocab`'s ranges."""
  graphdef, state = nnx.split(model)
  start = int(rows["start"])
  transfusion = _is_transfusion(model)
  extras = {k: jnp.asarray(rows[k]) for k in ("image_ids", "patches") if transfusion}

  def logits_at(state, tokens, column):
    m = nnx.merge(graphdef, state)
    modality = jnp.where((tokens >= vocab.image_offset) & (tokens < vocab.audio_offset), 1, 0)
    modality = jnp.where((tokens >= vocab.audio_offset) & (tokens < vocab.size), 2, modality)
    positions, segment_ids = jnp.asarray(rows["positions"]), jnp.asarray(rows["segment_ids"])
    if transfusion:
      out, _ = m(tokens, positions, segment_ids, modality, extras["image_ids"], extras["patches"],
                 jnp.zeros(tokens.shape, jnp.int32))
    else:
      out = m(tokens, positions, segment_ids, modality)
    return jax.lax.dynamic_index_in_dim(out, column, axis=1, keepdims=False)[:, lo:hi]  # [B, hi - lo]

  @jax.jit
  def run(state, tokens, key):
    def body(t, carry):
      tokens, key = carry
      key, sub = jax.random.split(key)
      choice = sample_tokens(logits_at(state, tokens, start + t - 1), sub, Sampling(temperature, top_k))
      tokens = jax.lax.dynamic_update_index_in_dim(tokens, (choice + lo).astype(tokens.dtype), start + t, axis=1)
      return tokens, key
    tokens, _ = jax.lax.fori_loop(0, n_new, body, (tokens, key))
    return tokens[:, start:start + n_new]

  return np.asarray(run(state, jnp.asarray(rows["tokens"]), jax.random.PRNGKey(seed)))


def _text_until_eos(vocab, ids: np.ndarray) -> str:
  return vocab.decode_text(until_stop_id(ids, [EOS]))


def generate_captions(model, vocab, images: np.ndarray, *, image_tokenizer=None, patch_size: int = 4,
                      max_bytes: int = 48) -> list[str]:
  """Greedy captions of images f32 [N, H, W, 3] (the image -> caption documents: BOS <boi> image <eoi>,
  then text up to EOS). Chameleon: the image is its VQ codes; Transfusion: its clean patches."""
  if _is_transfusion(model):
    from common.data.mixed_modal.documents import patchify
    patches = patchify(np.asarray(images, np.float32), patch_size)  # [N, n_patches, patch_dim]
    n_image = patches.shape[1]
    body = np.full((len(images), n_image), vocab.image_offset, np.int32)
  else:
    body = vocab.image_tokens(image_tokenizer.encode(images))
    n_image = body.shape[1]
  prompts = [np.concatenate([[0, vocab.boi], b, [vocab.eoi]]).astype(np.int32) for b in body]
  rows = left_padded(prompts, max_bytes)
  if _is_transfusion(model):
    image_ids = np.zeros_like(rows["tokens"])
    image_ids[:, 2:2 + n_image] = 1  # every prompt has the same length: no left padding
    full = np.zeros((*rows["tokens"].shape, patches.shape[-1]), np.float32)
    full[:, 2:2 + n_image] = patches
    rows.update(image_ids=image_ids, patches=full)
  ids = sample_continuations(model, vocab, rows, max_bytes, lo=1, hi=vocab.boi)
  return [_text_until_eos(vocab, row) for row in ids]


def generate_images(model, vocab, captions: list[str], *, image_tokenizer=None, image_size: int = 32,
                    patch_size: int = 4, temperature: float = 1.0, top_k: int = 32, seed: int = 0,
                    sample_steps: int = 50, guidance_scale: float = 1.0) -> np.ndarray:
  """Images f32 [N, H, W, 3] in [-1, 1], one per caption. Chameleon: the image tokens sampled after
  `BOS caption <boi>` (restricted to the image codes), decoded by the VQ tokenizer. Transfusion: DDIM over
  the patches after the caption (`mot.transfusion.sample_images`), classifier-free guided at
  `guidance_scale` (1: unguided)."""
  if _is_transfusion(model):
    from common.data.mixed_modal.documents import unpatchify
    from mot.transfusion import sample_images
    encoded = [vocab.encode_text(c) for c in captions]
    width = max(len(e) for e in encoded)
    caption_tokens = np.zeros((len(captions), width), np.int32)
    for i, e in enumerate(encoded):
      caption_tokens[i, width - len(e):] = e
    patches = sample_images(model, jnp.asarray(caption_tokens), sample_steps, rng=jax.random.PRNGKey(seed),
                            guidance_scale=guidance_scale)
    return np.clip(unpatchify(np.asarray(patches), image_size, patch_size), -1.0, 1.0)
  n_codes = image_tokenizer.tokens_per_image
  prompts = [np.concatenate([[0], vocab.encode_text(c), [vocab.boi]]).astype(np.int32) for c in captions]
  codes = sample_continuations(model, vocab, left_padded(prompts, n_codes), n_codes, lo=vocab.image_offset,
                               hi=vocab.image_offset + image_tokenizer.codebook_size, temperature=temperature,
                               top_k=top_k, seed=seed)
  return image_tokenizer.decode(codes - vocab.image_offset)
