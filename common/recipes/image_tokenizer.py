"""The image tokenizer of the Chameleon setting as an artefact: a `mot.train_image_tokenizer` run read back
(`load_image_tokenizer`), or the tiny default trained once on generated scenes and cached
(`default_image_tokenizer`). `for_data(data_cfg)` is what mixed-modal trainers call to get the tokenizer their
`data.*` section names; the data pipeline itself only receives the tokenizer, it never trains one."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import sys
import time

import jax

from common.config import ConfigError
from common.models.vq_autoencoder import ImageTokenizer, build_vq_model
from common.tasks.vq import vq_config, vq_task
from common.train.loop import train_to_completion
from common.train.restore import load_run_model, read_run_config

IMAGE_TOKENIZER_KEY = "data.image_tokenizer"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "meta_papers_jax", "image_tokenizer")


def load_image_tokenizer(workdir: str, key: str = IMAGE_TOKENIZER_KEY) -> ImageTokenizer:
  """The tokenizer of a `mot.train_image_tokenizer` run: DIR/config.json and the newest readable checkpoint.
  A missing or foreign run is a ConfigError naming `key` and the path."""
  cfg = read_run_config(workdir, key)
  if cfg.get("model", {}).get("name") != "vq_autoencoder":
    raise ConfigError(f"config key '{key}': '{workdir}' is not a VQ autoencoder run "
                      f"(model.name '{cfg.get('model', {}).get('name')}', expected 'vq_autoencoder')")
  model, _ = load_run_model(workdir, cfg, lambda: build_vq_model(cfg.model, int(cfg.train.seed)), key=key)
  return ImageTokenizer(model, cfg.model, int(cfg.data.image_size))


def tiny_tokenizer_config(image_size: int):
  """The run `default_image_tokenizer` trains (mot/configs/image_tokenizer.py at its defaults)."""
  cfg = vq_config(image_size)
  cfg.log.progress = "lines"
  return cfg


def default_image_tokenizer(cache_dir: str = "", image_size: int = 32) -> ImageTokenizer:
  """The tiny tokenizer trained on generated scenes, from `cache_dir` (default ~/.cache/meta_papers_jax/
  image_tokenizer): the run is keyed by a hash of its config, trained in this process on first use (on one
  device, about a minute on a laptop CPU, one note on stderr) and read back afterwards. A file lock makes
  concurrent first uses train once."""
  cfg = tiny_tokenizer_config(int(image_size))
  digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
  root = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  workdir = os.path.join(root, f"vq_tiny_{image_size}px_{digest}")
  done = os.path.join(workdir, "trained")
  os.makedirs(root, exist_ok=True)
  with open(workdir + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(done):
      print(f"[image tokenizer] training the tiny VQ tokenizer once into {workdir} "
            f"({cfg.train.steps} steps, about a minute)", file=sys.stderr, flush=True)
      start = time.time()
      with contextlib.redirect_stdout(io.StringIO()):
        train_to_completion(cfg, workdir, vq_task(cfg), what="the default image tokenizer",
                            devices=jax.local_devices()[:1])
      with open(done, "w") as f:
        f.write(f"{time.time() - start:.1f}s\n")
  return load_image_tokenizer(workdir, key="data.cache_dir")


def codebook_size(data_cfg) -> int:
  """The codebook size of the tokenizer `for_data` returns, read from configs alone (nothing trained or
  loaded), so that a trainer resolves its vocabulary before it builds anything."""
  if data_cfg.image_tokenizer:
    return int(read_run_config(data_cfg.image_tokenizer, IMAGE_TOKENIZER_KEY).model.codebook_size)
  return int(tiny_tokenizer_config(int(data_cfg.image_size)).model.codebook_size)


def for_data(data_cfg) -> ImageTokenizer | None:
  """The image tokenizer a mixed-modal `data.*` section asks for: the run `data.image_tokenizer` names, the
  cached default when it is '', or None when the data has no discrete image tokens."""
  if data_cfg.setting != "chameleon" or "image" not in data_cfg.modalities:
    return None
  if data_cfg.image_tokenizer:
    return load_image_tokenizer(data_cfg.image_tokenizer)
  return default_image_tokenizer(data_cfg.cache_dir, data_cfg.image_size)
