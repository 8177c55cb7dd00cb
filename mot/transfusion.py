"""The Transfusion setting (Zhou et al. 2024, arXiv 2408.11039) on the MoT layer stack: discrete text tokens
trained by next-token prediction and continuous image patches trained by diffusion, in one sequence.

Sec. 3 of Transfusion: an image is a run of patch vectors between <boi> and <eoi>; a linear layer maps each
noised patch to the model width (with an embedding of its diffusion timestep added, one timestep per image)
and another maps the output back to a noise prediction; attention is causal over the sequence and
bidirectional within each image (sec. 3.2); the loss is L_LM + lambda L_DDPM (sec. 3.3, lambda = 5 in sec.
4). MoT (Liang et al. 2024, sec. 3.2) unties the transformer's weights between text and image positions;
`model.untied=False` gives the dense Transfusion baseline with the same code.

Loss as sums (so micro-batching is exact, `common.train.step`): every text target contributes its cross-
entropy and every image position lambda x its noise MSE (mean over the patch vector), and the weight counts
both; per-modality sums are reported (`nll/text`, `weight/text`, `mse/image`, `weight/image`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from common.nn import DTYPES
from common.nn import Embed, Linear
from common.nn.attention import attention_mask
from common.nn.training_rng import next_training_key
from mot import diffusion
from mot.model import AttentionInputs, MoTTransformer, validate_mot_config

IMAGE = 1  # the image modality index of the mixed-modal contract (common.data.mixed_modal.IMAGE)


def transfusion_mask(segment_ids: jax.Array, image_ids: jax.Array) -> jax.Array:
  """bool [batch, 1, L, L]: same document, and causal OR both positions in the same image (image_ids > 0,
  unique within a row): Transfusion's attention mask (sec. 3.2, fig. 4)."""
  causal = attention_mask(segment_ids, segment_ids, causal=True)
  same_doc = attention_mask(segment_ids, segment_ids, causal=False)
  same_image = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] > 0)
  return causal | (same_doc & same_image[:, None])


class TransfusionLM(nnx.Module):
  """`model(inputs, positions, segment_ids, modality, image_ids, noisy_patches, timesteps)` ->
  (text logits f32 [B, L, V], predicted noise f32 [B, L, patch_dim]). Image positions (image_ids > 0) take
  patch_in(noisy patch) + time_mlp(sinusoid(t)) instead of the token embedding."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    validate_mot_config(cfg)
    self.cfg = cfg
    dtype = DTYPES[cfg.dtype]
    d, patch_dim = cfg.d_model, int(cfg.patch_dim)
    self.embed = Embed(cfg.vocab_size, d, rngs=rngs, dtype=dtype)
    self.patch_in = Linear(patch_dim, d, axes=("patch", "embed"), rngs=rngs, dtype=dtype)
    self.time_in = Linear(d, d, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.time_out = Linear(d, d, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.transformer = MoTTransformer(cfg, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else Linear(d, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs,
                                                          dtype=dtype)
    self.patch_out = Linear(d, patch_dim, axes=("embed", "patch"), rngs=rngs, dtype=dtype)

  @property
  def schedule(self) -> diffusion.Schedule:
    return diffusion.make_schedule(self.cfg.diffusion.schedule, int(self.cfg.diffusion.steps))

  def __call__(self, inputs, positions, segment_ids, modality, image_ids, noisy_patches, timesteps):
    is_image = (image_ids > 0)[..., None]
    time = self.time_out(jax.nn.silu(self.time_in(diffusion.timestep_embedding(timesteps, self.cfg.d_model))))
    x = jnp.where(is_image, self.patch_in(noisy_patches) + time, self.embed(inputs))
    ctx = AttentionInputs(positions, segment_ids, transfusion_mask(segment_ids, image_ids))
    h = self.transformer(x, modality, ctx)
    logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
    return logits.astype(jnp.float32), self.patch_out(h).astype(jnp.float32)


def noise_images(schedule: diffusion.Schedule, patches, image_ids, key):
  """(noisy patches, timesteps [B, L], noise): one timestep per image, uniform over [0, T) (Transfusion sec.
  3.3), shared by all its patches; positions outside images keep timestep 0 and are never read."""
  t_key, n_key = jax.random.split(key)
  b, length = image_ids.shape
  per_image = jax.random.randint(t_key, (b, length), 0, schedule.steps)  # one draw per possible image id
  timesteps = jnp.where(image_ids > 0, jnp.take_along_axis(per_image, image_ids, axis=1), 0)
  noise = jax.random.normal(n_key, patches.shape, jnp.float32).astype(patches.dtype)
  return diffusion.q_sample(patches, timesteps, noise, schedule), timesteps, noise


def transfusion_loss(model: TransfusionLM, batch: dict):
  """(text nll sum + lambda x image noise-MSE sum, text targets + image positions, per-modality sums).
  Training draws timesteps and noise from `next_training_key()`; evaluation (no training key) uses a fixed
  key, so eval losses are comparable across steps."""
  key = next_training_key()
  key = jax.random.PRNGKey(0) if key is None else key
  image_ids = batch["image_ids"]
  noisy, timesteps, noise = noise_images(model.schedule, batch["patches"], image_ids, key)
  logits, predicted = model(batch["inputs"], batch["positions"], batch["segment_ids"], batch["modality"],
                            image_ids, noisy, timesteps)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"]
  nll_sum, text_weight = jnp.sum(nll * mask), jnp.sum(mask)
  mse_sum, image_weight = diffusion.epsilon_loss(predicted, noise, image_ids > 0)
  lam = float(model.cfg.diffusion.loss_weight)
  sums = {"nll/text": nll_sum, "weight/text": text_weight, "mse/image": mse_sum, "weight/image": image_weight}
  return nll_sum + lam * mse_sum, text_weight + image_weight, sums


def _caption_layout(caption_tokens: jax.Array, boi_id: int, n_patches: int):
  """Rows [left padding (0), BOS (0), caption, <boi>, n_patches image slots], as the training documents
  `BOS caption <boi> image` start: (inputs, positions, segment_ids, modality, image_ids), each
  [B, 1 + Lc + 1 + n_patches]. `caption_tokens` [B, Lc] is left-padded with 0 and holds no BOS."""
  b, lc = caption_tokens.shape
  first = jnp.argmax(jnp.concatenate([caption_tokens != 0, jnp.ones((b, 1), bool)], axis=1), axis=1)  # [B]
  length = 1 + lc + 1 + n_patches
  index = jnp.arange(length)[None, :]
  inputs = jnp.concatenate([jnp.zeros((b, 1), caption_tokens.dtype), caption_tokens,
                            jnp.full((b, 1), boi_id, caption_tokens.dtype),
                            jnp.zeros((b, n_patches), caption_tokens.dtype)], axis=1)
  # The BOS sits just before the first caption token: column `first` of the shifted row.
  segment_ids = (index >= first[:, None]).astype(jnp.int32)
  positions = jnp.maximum(index - first[:, None], 0).astype(jnp.int32)
  image_ids = (index > lc + 1).astype(jnp.int32) * jnp.ones((b, 1), jnp.int32)
  modality = image_ids * IMAGE
  return inputs.astype(jnp.int32), positions, segment_ids, modality, image_ids


@functools.partial(nnx.jit, static_argnames=("method", "clip"))
def _denoise_step(model, layout, x, t, t_prev, key, *, method: str, clip: bool):
  """One reverse step of `sample_images`: the model over caption + <boi> + x, then DDIM or DDPM."""
  inputs, positions, segment_ids, modality, image_ids = layout
  n_prefix = inputs.shape[1] - x.shape[1]
  full = jnp.concatenate([jnp.zeros((x.shape[0], n_prefix, x.shape[2]), x.dtype), x], axis=1)
  _, eps = model(inputs, positions, segment_ids, modality, image_ids, full, jnp.where(image_ids > 0, t, 0))
  eps = eps[:, n_prefix:]
  if method == "ddim":
    return diffusion.ddim_step(x, eps, t, t_prev, model.schedule, clip=clip)
  noise = jnp.where(t_prev >= 0, jax.random.normal(key, x.shape, x.dtype), 0.0)
  return diffusion.ddpm_step(x, eps, t, t_prev, model.schedule, noise=noise, clip=clip)


def sample_images(model: TransfusionLM, caption_tokens: jax.Array, n_steps: int, method: str = "ddim",
                  rng: jax.Array | None = None, *, clip: bool = True) -> jax.Array:
  """Patches f32 [B, patches_per_image, patch_dim] of one image per caption (caption_tokens int [B, Lc],
  left-padded with 0): starting from Gaussian noise, each of `n_steps` denoising steps runs the model over
  caption + <boi> + the current noisy patches (bidirectional among the patches) and takes a DDIM (eta 0) or
  DDPM (posterior sample) step (`mot.diffusion`), from t = T - 1 down to 0. One compilation per model and
  shape serves every step and call."""
  if method not in ("ddim", "ddpm"):
    raise ValueError(f"method must be 'ddim' or 'ddpm', got '{method}'")
  cfg = model.cfg
  n_patches, patch_dim = int(cfg.patches_per_image), int(cfg.patch_dim)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  layout = _caption_layout(jnp.asarray(caption_tokens, jnp.int32), int(cfg.boi_id), n_patches)
  times = diffusion.sampling_timesteps(model.schedule.steps, n_steps)
  prev = np.concatenate([times[1:], [-1]]).astype(np.int32)
  rng, start = jax.random.split(rng)
  x = jax.random.normal(start, (caption_tokens.shape[0], n_patches, patch_dim), jnp.float32)
  for t, t_prev in zip(times, prev):
    rng, key = jax.random.split(rng)
    x = _denoise_step(model, layout, x, jnp.int32(t), jnp.int32(t_prev), key, method=method, clip=clip)
  return x
