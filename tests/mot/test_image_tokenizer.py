"""The VQ image tokenizer (common.models.vq_autoencoder, common.tasks.vq, mot.train_image_tokenizer)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from common.config import ConfigError
from common.models.vq_autoencoder import MODEL_DEFAULTS, ImageTokenizer, build_vq_model, vq_loss_terms
from common.recipes.image_tokenizer import load_image_tokenizer
from common.tasks.vq import ImageData, vq_config, vq_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 16


def small_model_cfg(**overrides) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict(MODEL_DEFAULTS)
  m.update(channels=32, codebook_size=16, latent_dim=8, **overrides)
  return m


PALETTE = np.array([[-0.8, -0.8, 0.9], [0.9, -0.6, -0.7], [0.1, -0.2, 0.3], [0.8, 0.8, -0.9]], np.float32)


def blocky_images(n: int, seed: int, size: int = SIZE) -> np.ndarray:
  """Two rectangles on a background, each a flat colour of a 4-colour palette, in [-1, 1]; the rectangles
  lie on the 4-pixel token grid, so 4 codes can reconstruct them exactly."""
  rng = np.random.default_rng(seed)
  out = np.empty((n, size, size, 3), np.float32)
  cells = size // 4
  for i in range(n):
    out[i] = PALETTE[rng.integers(len(PALETTE))]
    for _ in range(2):
      y, x = 4 * rng.integers(0, cells - 1, 2)
      h, w = 4 * rng.integers(1, cells // 2 + 1, 2)
      out[i, y:y + h, x:x + w] = PALETTE[rng.integers(len(PALETTE))]
  return out


def tiny_cfg(steps: int):
  cfg = vq_config(SIZE)
  cfg.model = small_model_cfg()
  cfg.train.update(steps=steps, batch_size=16, warmup_steps=2, learning_rate=1e-2)
  cfg.log.update(every_steps=1, progress="lines")
  cfg.eval.update(every_steps=steps, batches=2)
  cfg.checkpoint.update(every_steps=steps, async_save=False)
  return cfg


def test_codebook_vectors_quantize_to_themselves():
  model = build_vq_model(small_model_cfg(), seed=0)
  table = model.codes_table()
  codes, quantized = model.quantize(table)
  np.testing.assert_array_equal(np.asarray(codes), np.arange(table.shape[0]))
  np.testing.assert_allclose(np.asarray(quantized), np.asarray(table), rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A workdir of 100 steps on palette images, trained in this process on one device."""
  from common.train.loop import train
  workdir = tmp_path_factory.mktemp("vq_run")
  cfg = tiny_cfg(steps=100)
  data = ImageData(blocky_images(256, 0), blocky_images(32, 1), batch_size=16, seed=0)
  assert train(cfg, str(workdir), vq_task(cfg, data), devices=jax.local_devices()[:1]) == 0
  return workdir


def test_decoded_codes_re_encode_to_the_same_codes_after_training(trained_run):
  tokenizer = load_image_tokenizer(str(trained_run))
  images = blocky_images(16, 2)
  codes = tokenizer.encode(images)
  assert codes.shape == (16, (SIZE // 4) ** 2) and codes.dtype == np.int32
  decoded = tokenizer.decode(codes)
  assert decoded.shape == images.shape and np.all(np.abs(decoded) <= 1.0)
  assert np.mean((decoded - images) ** 2) < 0.05  # 0.005 measured
  # decode(encode(x)) re-encodes to the codes of x (1.0 measured): each decoded patch lies in its code's cell.
  assert np.mean(tokenizer.encode(decoded) == codes) > 0.95
  # and decoding is a pure function of the codes, in any chunking.
  np.testing.assert_array_equal(tokenizer.decode(codes[:5]), decoded[:5])


def test_straight_through_gradient_is_the_decoder_input_gradient():
  model = build_vq_model(small_model_cfg(), seed=1)
  images = jnp.asarray(blocky_images(4, 3))
  graphdef, params = nnx.split(model)

  def recon_via_quantizer(latents):
    m = nnx.merge(graphdef, params)
    _, quantized = m.quantize(latents)
    passed = latents + jax.lax.stop_gradient(quantized - latents)
    return jnp.mean((m.reconstruct(passed) - images) ** 2)

  def recon_of(latents):
    return jnp.mean((nnx.merge(graphdef, params).reconstruct(latents) - images) ** 2)

  latents = model.latents(images)
  quantized = model.quantize(latents)[1]
  np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(recon_via_quantizer))(latents)),
                             np.asarray(jax.jit(jax.grad(recon_of))(quantized)), rtol=1e-3, atol=1e-8)

  def recon_loss(p):
    m = nnx.merge(graphdef, p)
    return jnp.mean(vq_loss_terms(images, m(images))["recon"])

  grads = jax.jit(jax.grad(recon_loss))(params)
  encoder_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["encoder"]))
  assert encoder_norm > 0.0
  assert float(jnp.sum(grads["codebook"][...] ** 2)) == 0.0  # the codebook learns from its own loss only


def test_commitment_and_codebook_losses_match_a_hand_computation():
  model = build_vq_model(small_model_cfg(), seed=2)
  images = jnp.asarray(blocky_images(3, 4))
  terms = vq_loss_terms(images, model(images))
  latents = np.asarray(model.latents(images), np.float64).reshape(3, -1, 8)  # [N, h*w, D]
  table = np.asarray(model.codes_table(), np.float64)  # [K, D]
  expected = []
  for z in latents:
    nearest = [min(np.sum((v - e) ** 2) for e in table) for v in z]
    expected.append(np.mean(nearest) / z.shape[-1])
  np.testing.assert_allclose(np.asarray(terms["commit"]), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(terms["codebook"]), expected, rtol=1e-5)


def test_training_lowers_the_reconstruction_loss(trained_run):
  rows = [json.loads(line) for line in open(trained_run / "metrics.jsonl")]
  recon = [r["recon"] for r in rows if "recon" in r]
  assert np.mean(recon[-5:]) < 0.2 * np.mean(recon[:5])
  evals = [r for r in rows if "eval/mse" in r]
  assert evals and 0.0 < evals[-1]["eval/codebook_usage"] <= 1.0 and evals[-1]["eval/psnr"] > 0.0


def run_cli(*args, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "mot.train_image_tokenizer", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_a_checkpoint_that_load_image_tokenizer_reads(tmp_path):
  from PIL import Image
  folder = tmp_path / "images"
  folder.mkdir()
  for i, image in enumerate(blocky_images(24, 7)):
    Image.fromarray(((image + 1) * 127.5).round().astype(np.uint8)).save(folder / f"{i:02d}.png")
  workdir = tmp_path / "run"
  result = run_cli(f"--config={REPO}/mot/configs/image_tokenizer.py:image_size={SIZE}", f"--workdir={workdir}",
                   "--config.data.source=files", f"--config.data.path={folder}", "--config.data.n_eval_images=8",
                   "--config.train.steps=2", "--config.train.batch_size=8", "--config.checkpoint.every_steps=2",
                   "--config.eval.every_steps=2", "--config.eval.batches=1", "--config.model.channels=16")
  assert result.returncode == 0, result.stderr
  assert os.listdir(workdir / "checkpoints") == ["2"]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert any("eval/psnr" in r for r in rows)
  tokenizer = load_image_tokenizer(str(workdir))
  assert isinstance(tokenizer, ImageTokenizer) and tokenizer.tokens_per_image == 16
  assert tokenizer.codebook_size == 256
  codes = tokenizer.encode(blocky_images(3, 8))
  assert codes.shape == (3, 16) and codes.min() >= 0 and codes.max() < 256


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
  result = run_cli(f"--config={REPO}/mot/configs/image_tokenizer.py", f"--workdir={tmp_path / 'run'}",
                   "--config.model.patch_size=5")
  assert result.returncode == 2
  assert "model.patch_size" in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()


def test_load_image_tokenizer_names_the_path_of_a_bad_workdir(tmp_path):
  with pytest.raises(ConfigError, match="holds no config.json"):
    load_image_tokenizer(str(tmp_path / "missing"))
  other = tmp_path / "lm_run"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model": {"name": "dense_lm"}}))
  with pytest.raises(ConfigError, match="not a VQ autoencoder run"):
    load_image_tokenizer(str(other))
  (tmp_path / "vq_run").mkdir()
  (tmp_path / "vq_run" / "config.json").write_text(json.dumps(vq_config(SIZE).to_dict()))
  with pytest.raises(ConfigError, match="holds no checkpoints"):
    load_image_tokenizer(str(tmp_path / "vq_run"))


def test_image_data_batches_are_a_pure_function_of_seed_and_position():
  pool = blocky_images(10, 9)
  data = ImageData(pool, pool[:3], batch_size=4, seed=3)
  again = ImageData(pool, pool[:3], batch_size=4, seed=3)
  np.testing.assert_array_equal(data.train_batch(8)["images"], again.train_batch(8)["images"])
  # one epoch of 10 consecutive positions visits every image once
  seen = np.concatenate([data.train_batch(p)["images"][:1] for p in range(10)])
  assert sorted(map(bytes, seen)) == sorted(map(bytes, pool))
