"""The discrete image tokenizer of the Chameleon setting: a small VQ-VAE (van den Oord et al. 2017, arXiv
1711.00937) whose codes are the image tokens of a mixed-modal LM (Chameleon, arXiv 2405.09818, Sec. 2.1, uses
a VQ tokenizer with 8192 codes and 1024 tokens per 512x512 image; this one has 256 codes and 64 tokens per
32x32 image).

The encoder maps each `patch_size`^2 patch to a `latent_dim` vector (a convolution with kernel = stride =
patch, then per-patch ReLU layers: a stack of 4x4 stride-2 convolutions as in the paper's Sec. 4.1 ran over
10x slower per step under XLA on a CPU, too slow for a tokenizer trained on first use); each latent vector is
replaced by its nearest codebook entry (Sec. 3.1, Eq. 1-2) and the decoder maps that back to the patch's
pixels. The reconstruction gradient passes the quantizer unchanged (straight-through, Sec. 3.2); the codebook
learns from its own loss and the encoder is held near the codes by the commitment loss with weight beta
(Eq. 3). Two cheap, deterministic additions keep the codebook in use: latents and codes are compared on the
unit sphere (`unit_norm`), and unused codes are pulled towards the data (`code_pull_loss`); without the pull
the tiny run on scenes used 7% of the codes per eval batch instead of 70%.

`ImageTokenizer` is the trained model seen as a tokenizer (`encode`, `decode`). Reading a trained run and the
default tokenizer trained on first use are in `common.recipes.image_tokenizer` (they run the trainer).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.config import require
from common.nn import Linear

# The `model.*` section of a VQ autoencoder run (mot/configs/image_tokenizer.py starts from it).
MODEL_DEFAULTS = dict(
    name="vq_autoencoder",
    patch_size=4,       # pixels per token side: a 32x32 image -> 8x8 latents (64 tokens)
    channels=128,       # width of the per-patch MLPs
    layers=2,           # hidden layers of the encoder (and of the decoder)
    latent_dim=32,      # dimension of a codebook entry
    codebook_size=256,
    beta=0.25,          # commitment weight (Eq. 3; the paper uses 0.25 throughout)
    code_pull=0.1,      # weight of the pull of every code towards its nearest latent (revives dead codes)
    dtype="float32",
)


def validate_vq_config(m, image_size: int) -> None:
  """Checks `model.*` of a VQ autoencoder against the image size, naming the key."""
  require(m.get("name") == "vq_autoencoder", "model.name", f"must be 'vq_autoencoder', got '{m.get('name')}'")
  for key in ("patch_size", "channels", "layers", "latent_dim"):
    require(int(m[key]) > 0, f"model.{key}", f"must be positive, got {m[key]}")
  require(int(m.codebook_size) >= 2, "model.codebook_size", f"must be >= 2, got {m.codebook_size}")
  for key in ("beta", "code_pull"):
    require(float(m[key]) >= 0, f"model.{key}", f"must be >= 0, got {m[key]}")
  require(m.dtype == "float32", "model.dtype", f"the VQ autoencoder runs in float32, got '{m.dtype}'")
  require(image_size > 0 and image_size % int(m.patch_size) == 0, "model.patch_size",
          f"image size {image_size} is not divisible by the patch size {m.patch_size}")


def latent_grid(m, image_size: int) -> int:
  """Side of the latent grid: tokens per image is its square."""
  return image_size // int(m.patch_size)


def forward_flops_per_image(m, image_size: int) -> float:
  """Analytic FLOPs (2 per multiply-add) of encoder, quantizer distances and decoder for one image; a
  training step costs three times this (forward, and backward with respect to inputs and weights)."""
  c, d, k = int(m.channels), int(m.latent_dim), int(m.codebook_size)
  pixels = 3 * int(m.patch_size) ** 2
  per_side = pixels * c + (int(m.layers) - 1) * c * c + c * d
  return 2.0 * latent_grid(m, image_size) ** 2 * (2 * per_side + k * d)


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[N, H, W, 3] -> [N, H/p, W/p, p*p*3], each patch's pixels row-major."""
  n, h, w, c = images.shape
  x = images.reshape(n, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // patch, w // patch, patch * patch * c)


def unpatchify(patches: jax.Array, patch: int) -> jax.Array:
  """The inverse of `patchify`."""
  n, gh, gw, _ = patches.shape
  x = patches.reshape(n, gh, gw, patch, patch, -1)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * patch, gw * patch, -1)


class MLP(nnx.Module):
  """in -> `layers` ReLU layers of width `channels` -> out, on the last axis."""

  def __init__(self, in_dim: int, out_dim: int, m, *, rngs: nnx.Rngs):
    c = int(m.channels)
    widths = [in_dim] + [c] * int(m.layers)
    self.hidden = nnx.List([Linear(a, b, axes=(None, None), rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
    self.bias = nnx.List([nnx.Param(jnp.zeros((c,))) for _ in self.hidden])
    self.out = Linear(c, out_dim, axes=(None, None), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer, bias in zip(self.hidden, self.bias):
      x = jax.nn.relu(layer(x) + bias[...])
    return self.out(x)


def unit_norm(x: jax.Array) -> jax.Array:
  """x / ||x|| on the last axis. Latents and codes live on the unit sphere (the l2-normalised codes of
  ViT-VQGAN, Yu et al. 2021, arXiv 2110.04627, Sec. 3.2): their scales cannot drift apart, and far fewer codes
  end up unused."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def nearest_codes(latents: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest codebook entry (squared Euclidean distance, Eq. 1) of every latent vector.
  latents [..., D], codebook [K, D] -> int32 [...]."""
  distances = (jnp.sum(latents ** 2, -1, keepdims=True) - 2.0 * latents @ codebook.T
               + jnp.sum(codebook ** 2, -1))
  return jnp.argmin(distances, -1).astype(jnp.int32)


@dataclasses.dataclass
class VQOutput:
  reconstruction: jax.Array  # [N, H, W, 3]
  codes: jax.Array  # int32 [N, h, w]
  latents: jax.Array  # encoder output z_e, [N, h, w, D]
  quantized: jax.Array  # z_q = codebook[codes], [N, h, w, D]


class VQAutoencoder(nnx.Module):
  """Patch encoder, codebook [codebook_size, latent_dim], patch decoder."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    self.patch_size = int(m.patch_size)
    pixels = 3 * self.patch_size ** 2
    self.encoder = MLP(pixels, int(m.latent_dim), m, rngs=rngs)
    self.decoder = MLP(int(m.latent_dim), pixels, m, rngs=rngs)
    k, d = int(m.codebook_size), int(m.latent_dim)
    self.codebook = nnx.Param(unit_norm(jax.random.normal(rngs.params(), (k, d))))

  def codes_table(self) -> jax.Array:
    """The codebook as used: unit-norm rows [K, D]."""
    return unit_norm(self.codebook[...])

  def latents(self, images: jax.Array) -> jax.Array:
    """images [N, H, W, 3] -> unit-norm z_e [N, h, w, D]."""
    return unit_norm(self.encoder(patchify(images, self.patch_size)))

  def quantize(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(codes int32 [...], quantized [..., D]) of latents [..., D]."""
    codebook = self.codes_table()
    codes = nearest_codes(latents, codebook)
    return codes, codebook[codes]

  def reconstruct(self, quantized: jax.Array) -> jax.Array:
    """[N, h, w, D] -> images [N, H, W, 3]."""
    return unpatchify(self.decoder(quantized), self.patch_size)

  def encode(self, images: jax.Array) -> jax.Array:
    """images [N, H, W, 3] in [-1, 1] -> codes int32 [N, h, w]."""
    return self.quantize(self.latents(images))[0]

  def decode(self, codes: jax.Array) -> jax.Array:
    """codes int32 [N, h, w] -> images [N, H, W, 3]."""
    return self.reconstruct(self.codes_table()[codes])

  def __call__(self, images: jax.Array) -> VQOutput:
    latents = self.latents(images)
    codes, quantized = self.quantize(latents)
    # Straight-through (Sec. 3.2): the decoder sees z_q, the encoder receives the decoder's input gradient.
    passed = latents + jax.lax.stop_gradient(quantized - latents)
    return VQOutput(self.reconstruct(passed), codes, latents, quantized)


def vq_loss_terms(images: jax.Array, out: VQOutput) -> dict[str, jax.Array]:
  """Per-image terms of Eq. 3, each a mean over its elements (as the authors' Sonnet implementation):
  `recon` ||x - x_hat||^2, `codebook` ||sg[z_e] - e||^2 (moves the codes), `commit` ||z_e - sg[e]||^2
  (moves the encoder; weighted by beta in the objective). Each is f32 [N]."""
  sg = jax.lax.stop_gradient
  per_image = lambda x: jnp.mean(x.reshape(x.shape[0], -1), axis=1)
  return dict(recon=per_image((images - out.reconstruction) ** 2),
              codebook=per_image((sg(out.latents) - out.quantized) ** 2),
              commit=per_image((out.latents - sg(out.quantized)) ** 2))


def code_pull_loss(latents: jax.Array, codebook: jax.Array) -> jax.Array:
  """Mean over codes of the squared distance (per dimension) to the nearest latent of the batch. A code no
  latent picks gets no codebook gradient and would stay dead forever; this pull (a deterministic, gradient
  form of the dead-code restarts of later VQ work) moves it towards the data. latents [..., D] -> scalar."""
  flat = jax.lax.stop_gradient(latents.reshape(-1, latents.shape[-1]))
  distances = (jnp.sum(codebook ** 2, -1, keepdims=True) - 2.0 * codebook @ flat.T
               + jnp.sum(flat ** 2, -1))  # [K, M]
  return jnp.mean(jnp.maximum(jnp.min(distances, -1), 0.0)) / latents.shape[-1]


def code_statistics(codes: jax.Array, codebook_size: int) -> tuple[jax.Array, jax.Array]:
  """(perplexity, usage) of a batch of codes: exp of the entropy of the code histogram (codebook_size when
  all codes are equally used, 1 when one code takes everything) and the fraction of codes used at least once."""
  counts = jnp.bincount(codes.reshape(-1), length=codebook_size).astype(jnp.float32)
  probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
  return jnp.exp(entropy), jnp.mean((counts > 0).astype(jnp.float32))


def psnr(mse: float) -> float:
  """Peak signal-to-noise ratio in dB of pixels in [-1, 1] (peak-to-peak 2) at mean squared error `mse`."""
  return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def build_vq_model(m, seed: int) -> VQAutoencoder:
  return VQAutoencoder(m, rngs=nnx.Rngs(params=seed))


class ImageTokenizer:
  """A trained VQ autoencoder as a tokenizer: images f32 [N, H, W, 3] in [-1, 1] <-> codes int32
  [N, tokens_per_image] (row-major over the latent grid). Works on numpy arrays in fixed-size chunks, so
  any N compiles once."""

  def __init__(self, model: VQAutoencoder, model_cfg, image_size: int, chunk: int = 64):
    self.image_size = int(image_size)
    self.grid = latent_grid(model_cfg, self.image_size)
    self.tokens_per_image = self.grid * self.grid
    self.codebook_size = int(model_cfg.codebook_size)
    self._chunk = chunk
    graphdef, params = nnx.split(model)
    self._params = params
    self._encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x))
    self._decode = jax.jit(lambda p, c: jnp.clip(nnx.merge(graphdef, p).decode(c), -1.0, 1.0))

  def _chunked(self, fn, x: np.ndarray, out_dtype) -> np.ndarray:
    n = x.shape[0]
    pad = -n % self._chunk
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    parts = [np.asarray(fn(self._params, x[i:i + self._chunk])) for i in range(0, len(x), self._chunk)]
    return np.concatenate(parts)[:n].astype(out_dtype) if parts else np.zeros((0,), out_dtype)

  def encode(self, images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    side = self.image_size
    if images.ndim != 4 or images.shape[1:] != (side, side, 3):
      raise ValueError(f"ImageTokenizer.encode: expected images [N, {side}, {side}, 3], got {images.shape}")
    codes = self._chunked(self._encode, images, np.int32)
    return codes.reshape(images.shape[0], self.tokens_per_image)

  def decode(self, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
      raise ValueError(f"ImageTokenizer.decode: expected codes [N, {self.tokens_per_image}], got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
      raise ValueError(f"ImageTokenizer.decode: codes must lie in [0, {self.codebook_size})")
    grid = codes.astype(np.int32).reshape(-1, self.grid, self.grid)
    images = self._chunked(self._decode, grid, np.float32)
    return images.reshape(codes.shape[0], self.image_size, self.image_size, 3)
