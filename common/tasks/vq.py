"""Training the VQ image tokenizer (`common.models.vq_autoencoder`) on the shared loop, so that it gets
checkpoints, resume, metrics.jsonl and SIGTERM handling like every other trainer.

Images come from the generated scenes of the mixed-modal data (`common.data.mixed_modal.scenes`, the same
pictures the Chameleon-setting documents show) or from a folder of the user's images (`data.source='files'`).
A batch is {'images': f32 [batch, H, W, 3] in [-1, 1]}, drawn from a fixed pool in a seeded order per epoch,
so that it is a pure function of (seed, position) and a resumed run sees the same images.
"""
from __future__ import annotations

import glob
import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from common.config import require
from common.data import DataError
from common.models.vq_autoencoder import (MODEL_DEFAULTS, build_vq_model, code_pull_loss, code_statistics,
                                          forward_flops_per_image, psnr, validate_vq_config, vq_loss_terms)
from common.tasks.base import Task

SOURCES = ("scenes", "files")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def vq_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source="scenes",       # 'scenes' (generated shapes) | 'files' (every image under data.path)
      path="",               # folder of images (source='files'), searched recursively
      image_size=32,
      n_train_images=4096,   # pool sizes; 'files' uses all images, holding out n_eval_images (at most half)
      n_eval_images=256,
      seed=0,                # which scenes are generated
  ))


def vq_config(image_size: int = 32) -> ml_collections.ConfigDict:
  """The tiny tokenizer: 256 codes of 32 dims, 8x8 tokens of 4x4 pixels per 32x32 image, 400 steps of 64
  images; about a minute on a 2-core CPU. mot/configs/image_tokenizer.py and `default_image_tokenizer` use it."""
  from common.configs.base import base_config
  c = base_config()
  c.model = ml_collections.ConfigDict(MODEL_DEFAULTS)
  c.data = vq_data_config()
  c.data.image_size = int(image_size)
  c.train.update(steps=400, batch_size=64, learning_rate=5e-3, warmup_steps=20, weight_decay=0.0)
  c.checkpoint.update(every_steps=200, keep=1)
  c.log.every_steps = 50
  c.eval.update(every_steps=200, batches=4)
  return c


def validate_vq_task_config(cfg) -> None:
  """The cheap checks, before any image is rendered or read."""
  d = cfg.data
  require(d.source in SOURCES, "data.source", f"must be one of {SOURCES}, got '{d.source}'")
  require(int(d.image_size) > 0, "data.image_size", f"must be positive, got {d.image_size}")
  require(int(d.n_eval_images) > 0, "data.n_eval_images", f"must be positive, got {d.n_eval_images}")
  if d.source == "scenes":
    from common.data.mixed_modal.scenes import MIN_IMAGE_SIZE
    require(int(d.image_size) >= MIN_IMAGE_SIZE, "data.image_size",
            f"scenes need at least {MIN_IMAGE_SIZE} pixels a side, got {d.image_size}")
    require(int(d.n_train_images) > 0, "data.n_train_images", f"must be positive, got {d.n_train_images}")
  elif not d.path or not os.path.isdir(os.path.expanduser(d.path)):
    raise DataError(f"config key 'data.path': '{d.path}' is not a folder of images (data.source='files')")
  validate_vq_config(cfg.model, int(d.image_size))


def _read_images(folder: str, image_size: int) -> np.ndarray:
  """Every image under `folder` (sorted paths), RGB, resized to image_size^2, as f32 [N, S, S, 3] in [-1, 1]."""
  from PIL import Image
  paths = sorted(p for p in glob.glob(os.path.join(os.path.expanduser(folder), "**", "*"), recursive=True)
                 if p.lower().endswith(IMAGE_SUFFIXES))
  images = []
  for path in paths:
    try:
      with Image.open(path) as im:
        im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        images.append(np.asarray(im, np.float32) / 127.5 - 1.0)
    except OSError as e:
      raise DataError(f"config key 'data.path': cannot read image '{path}' ({e})") from None
  return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.float32)


def _render_scenes(n: int, seed: int, image_size: int) -> np.ndarray:
  from common.data.mixed_modal.scenes import render_batch, sample_scenes
  return render_batch(sample_scenes(n, seed, image_size), image_size)


class ImageData:
  """Duck-typed like `common.data.LMData` for the loop: `train_batch(position)`, `eval_batches(n)`."""

  def __init__(self, train_images: np.ndarray, eval_images: np.ndarray, *, batch_size: int, seed: int):
    self.train_images, self.eval_images = train_images, eval_images
    self.batch_size, self.seed = batch_size, seed

  @classmethod
  def from_config(cls, data_cfg, *, batch_size: int, seed: int) -> ImageData:
    size = int(data_cfg.image_size)
    if data_cfg.source == "files":
      images = _read_images(data_cfg.path, size)
      n_eval = min(int(data_cfg.n_eval_images), len(images) // 2)
      if n_eval == 0:
        raise DataError(f"config key 'data.path': '{data_cfg.path}' holds {len(images)} readable images; "
                        "need at least 2 (one to train on, one to evaluate)")
      return cls(images[n_eval:], images[:n_eval], batch_size=batch_size, seed=seed)
    train = _render_scenes(int(data_cfg.n_train_images), int(data_cfg.seed), size)
    # Eval scenes come from a different scene seed, so they are (almost surely) not training images.
    held_out = _render_scenes(int(data_cfg.n_eval_images), int(data_cfg.seed) + 7919, size)
    return cls(train, held_out, batch_size=batch_size, seed=seed)

  def train_batch(self, position: int) -> dict:
    """Images position .. position+batch-1 of the endless sequence that visits the pool once per epoch,
    each epoch in the order of a permutation seeded by (seed, epoch)."""
    n = len(self.train_images)
    index = position + np.arange(self.batch_size)
    rows = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(index // n):
      order = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
      here = index // n == epoch
      rows[here] = order[index[here] % n]
    return {"images": self.train_images[rows]}

  def eval_batches(self, n_batches: int):
    """Up to n_batches full batches of the held-out pool, always the same ones (cycled if the pool is short)."""
    n = len(self.eval_images)
    for b in range(n_batches):
      rows = (b * self.batch_size + np.arange(self.batch_size)) % n
      yield {"images": self.eval_images[rows]}


def vq_loss_fn(m):
  """loss_fn(model, batch) -> (objective summed over images, images, sums of recon / codebook / commit,
  and the batch-level code pull, code perplexity and usage times the batch's images). The objective per
  image is Eq. 3: recon + codebook + beta * commit, plus code_pull * the batch's pull."""
  beta, pull_weight, codebook_size = float(m.beta), float(m.code_pull), int(m.codebook_size)

  def loss_fn(model, batch):
    images = batch["images"]
    out = model(images)
    terms = vq_loss_terms(images, out)
    n = jnp.asarray(images.shape[0], jnp.float32)
    pull = code_pull_loss(out.latents, model.codes_table())
    perplexity, usage = code_statistics(out.codes, codebook_size)
    objective = jnp.sum(terms["recon"] + terms["codebook"] + beta * terms["commit"]) + pull_weight * pull * n
    sums = {k: jnp.sum(v) for k, v in terms.items()}
    return objective, n, dict(sums, code_pull=pull * n, perplexity=perplexity * n, codebook_usage=usage * n)

  return loss_fn


def vq_eval_summary(sums: dict) -> dict:
  """eval/mse, eval/psnr (of the pooled MSE), eval/codebook_usage (fraction of codes a batch uses, averaged
  over eval batches) and eval/perplexity (of the batch code histogram, not exp(loss))."""
  mse = sums["recon"] / sums["weight"]
  return dict(mse=mse, psnr=psnr(mse), codebook_usage=sums["codebook_usage"] / sums["weight"],
              perplexity=sums["perplexity"] / sums["weight"])


def vq_task(cfg, data: ImageData | None = None) -> Task:
  """The task of `cfg`; `data` (default: built from cfg.data) may be given to train on images in memory."""
  validate_vq_task_config(cfg)
  if data is None:
    data = ImageData.from_config(cfg.data, batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed))
  m = cfg.model
  return Task(
      build_model=lambda: build_vq_model(m, seed=int(cfg.train.seed)),
      loss_fn=vq_loss_fn(m),
      data=data,
      train_flops_per_example=3.0 * forward_flops_per_image(m, int(cfg.data.image_size)),
      units_per_example=1,
      throughput_key="images_per_sec",
      eval_summary=vq_eval_summary,
  )
