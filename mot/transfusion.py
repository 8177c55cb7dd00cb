"""The Transfusion setting (Zhou et al. 2024, arXiv 2408.11039) on the MoT layer stack: discrete text tokens
trained by next-token prediction and continuous image patches trained by diffusion, in one sequence.

Sec. 3 of Transfusion: an image is a run of patch vectors between <boi> and <eoi>; a linear layer maps each
noised patch to the model width (with an embedding of its diffusion timestep added, one timestep per image)
and another maps the output back to a noise prediction; attention is causal over the sequence and
bidirectional within each image (sec. 3.2); the loss is L_LM + lambda L_DDPM (sec. 3.3, lambda = 5 in sec.
4). MoT (Liang et al. 2024, sec. 3.2) unties the transformer's weights between text and image positions;
`model.untied=False` gives the dense Transfusion baseline with the same code.

Loss: L = L_LM + lambda L_DDPM with each term its own mean, the text cross-entropy over the text targets and
the noise MSE over the image patches' elements (sec. 3.3), so lambda does not depend on a batch's image
share. The shared step divides sums by a weight (`common.train.step`): a batch returns weight x L with weight
= text targets + image patches, so one micro-batch gives L exactly and micro-batches average their L by
their token counts (the paper's L over the whole batch only when they hold equal shares). Per-modality sums
are reported (`nll/text`, `weight/text`, `mse/image`, `weight/image`; eval sums them into both means).

Classifier-free guidance (Ho & Salimans 2022; Transfusion drops the caption with probability 0.1 in its
image-generation runs): `diffusion.caption_dropout` conditions a training document's image on an empty
caption, and `sample_images(..., guidance_scale=w)` mixes eps_uncond + w (eps_cond - eps_uncond).
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


def transfusion_mask(segment_ids: jax.Array, image_ids: jax.Array, hidden: jax.Array | None = None) -> jax.Array:
  """bool [batch, 1, L, L]: same document, and causal OR both positions in the same image (image_ids > 0,
  unique within a row): Transfusion's attention mask (sec. 3.2, fig. 4); without the (query, key) pairs of
  `hidden` bool [batch, L, L] when given (`drop_captions`)."""
  causal = attention_mask(segment_ids, segment_ids, causal=True)
  same_doc = attention_mask(segment_ids, segment_ids, causal=False)
  same_image = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] > 0)
  mask = causal | (same_doc & same_image[:, None])
  return mask if hidden is None else mask & ~hidden[:, None]


def drop_captions(positions: jax.Array, segment_ids: jax.Array, image_ids: jax.Array, dropped: jax.Array):
  """(positions, hidden [B, L, L]) that make every document of `dropped` bool [B, L + 1] (indexed by segment
  id) compute its image as if its caption were empty: from the <boi> before the document's first image on,
  its positions see neither the caption (the inputs between BOS and that <boi>) nor its length (their
  positions move back by it), so `BOS <boi> image ...` is computed exactly as the empty-caption document. The
  caption's tokens stay in the row with their text loss, which sees only what precedes them either way. A
  document whose image comes first (`BOS <boi> image <eoi> text`) has no caption to drop."""
  length = positions.shape[1]
  same_doc = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
  first_image = jnp.min(jnp.where(same_doc & (image_ids > 0)[:, None, :], positions[:, None, :], length), -1)
  boi = first_image - 1  # per position: the position of its document's <boi> (length - 1: no image)
  drop = jnp.take_along_axis(dropped, segment_ids, axis=1) & (first_image < length)
  caption = drop & (positions >= 1) & (positions < boi)
  after = drop & (positions >= boi)
  return jnp.where(after, positions - (boi - 1), positions), after[:, :, None] & caption[:, None, :]


class TransfusionLM(nnx.Module):
  """`model(inputs, positions, segment_ids, modality, image_ids, noisy_patches, timesteps[, hidden])` ->
  (text logits f32 [B, L, V], predicted noise f32 [B, L, patch_dim]). Image positions (image_ids > 0) take
  patch_in(noisy patch) + time_mlp(sinusoid(t)) instead of the token embedding; `hidden` (bool [B, L, L])
  removes (query, key) pairs from the attention mask (`drop_captions`)."""

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

  def __call__(self, inputs, positions, segment_ids, modality, image_ids, noisy_patches, timesteps, hidden=None):
    is_image = (image_ids > 0)[..., None]
    time = self.time_out(jax.nn.silu(self.time_in(diffusion.timestep_embedding(timesteps, self.cfg.d_model))))
    x = jnp.where(is_image, self.patch_in(noisy_patches) + time, self.embed(inputs))
    ctx = AttentionInputs(positions, segment_ids, transfusion_mask(segment_ids, image_ids, hidden))
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
  """(weight x (text CE mean + lambda x image noise-MSE mean), weight = text targets + image positions, metric
  sums; `loss_text` / `loss_image` are weight x each mean, so the train log shows the means). Training draws
  timesteps and noise from `next_training_key()`, and with `diffusion.caption_dropout` > 0 drops each
  document's caption with that probability (`drop_captions`); evaluation (no training key) uses a fixed key
  and keeps every caption, so eval losses are comparable across steps."""
  cfg = model.cfg
  key = next_training_key()
  rate = float(cfg.diffusion.get("caption_dropout", 0.0))
  positions, hidden, image_ids = batch["positions"], None, batch["image_ids"]
  if key is not None and rate > 0:
    key, drop_key = jax.random.split(key)
    b, length = image_ids.shape
    dropped = jax.random.uniform(drop_key, (b, length + 1)) < rate  # one draw per segment id
    positions, hidden = drop_captions(positions, batch["segment_ids"], image_ids, dropped)
  key = jax.random.PRNGKey(0) if key is None else key
  noisy, timesteps, noise = noise_images(model.schedule, batch["patches"], image_ids, key)
  logits, predicted = model(batch["inputs"], positions, batch["segment_ids"], batch["modality"], image_ids, noisy,
                            timesteps, hidden)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"]
  nll_sum, text_weight = jnp.sum(nll * mask), jnp.sum(mask)
  mse_sum, image_weight = diffusion.epsilon_loss(predicted, noise, image_ids > 0)
  text_mean, image_mean = nll_sum / jnp.maximum(text_weight, 1.0), mse_sum / jnp.maximum(image_weight, 1.0)
  weight = text_weight + image_weight
  sums = {"nll/text": nll_sum, "weight/text": text_weight, "mse/image": mse_sum, "weight/image": image_weight,
          "loss_text": weight * text_mean, "loss_image": weight * image_mean}
  return weight * (text_mean + float(cfg.diffusion.loss_weight) * image_mean), weight, sums


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
def _denoise_step(model, layout, x, t, t_prev, key, scale, *, method: str, clip: bool):
  """One reverse step of `sample_images`: the model over caption + <boi> + x, then DDIM or DDPM. A layout of
  twice x's rows holds the captions, then the empty captions: guidance mixes their two predictions."""
  inputs, positions, segment_ids, modality, image_ids = layout
  n_prefix = inputs.shape[1] - x.shape[1]
  copies = inputs.shape[0] // x.shape[0]
  xs = jnp.concatenate([x] * copies, axis=0)
  full = jnp.concatenate([jnp.zeros((xs.shape[0], n_prefix, xs.shape[2]), xs.dtype), xs], axis=1)
  _, eps = model(inputs, positions, segment_ids, modality, image_ids, full, jnp.where(image_ids > 0, t, 0))
  eps = eps[:, n_prefix:]
  if copies == 2:
    cond, uncond = jnp.split(eps, 2)
    eps = uncond + scale * (cond - uncond)
  if method == "ddim":
    return diffusion.ddim_step(x, eps, t, t_prev, model.schedule, clip=clip)
  noise = jnp.where(t_prev >= 0, jax.random.normal(key, x.shape, x.dtype), 0.0)
  return diffusion.ddpm_step(x, eps, t, t_prev, model.schedule, noise=noise, clip=clip)


def sample_images(model: TransfusionLM, caption_tokens: jax.Array, n_steps: int, method: str = "ddim",
                  rng: jax.Array | None = None, *, clip: bool = True, guidance_scale: float = 1.0) -> jax.Array:
  """Patches f32 [B, patches_per_image, patch_dim] of one image per caption (caption_tokens int [B, Lc],
  left-padded with 0): starting from Gaussian noise, each of `n_steps` denoising steps runs the model over
  caption + <boi> + the current noisy patches (bidirectional among the patches) and takes a DDIM (eta 0) or
  DDPM (posterior sample) step (`mot.diffusion`), from t = T - 1 down to 0. `guidance_scale` w != 1 also
  runs each step on the empty caption (what `diffusion.caption_dropout` trains) and steps with eps_uncond +
  w (eps_cond - eps_uncond) (classifier-free guidance, Ho & Salimans 2022); w = 1 is the conditional sampler
  alone. One compilation per model and shape serves every step and call."""
  if method not in ("ddim", "ddpm"):
    raise ValueError(f"method must be 'ddim' or 'ddpm', got '{method}'")
  cfg = model.cfg
  n_patches, patch_dim = int(cfg.patches_per_image), int(cfg.patch_dim)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  caption_tokens = jnp.asarray(caption_tokens, jnp.int32)
  layout = _caption_layout(caption_tokens, int(cfg.boi_id), n_patches)
  if guidance_scale != 1.0:
    empty = _caption_layout(jnp.zeros_like(caption_tokens), int(cfg.boi_id), n_patches)
    layout = tuple(jnp.concatenate([a, b]) for a, b in zip(layout, empty))
  times = diffusion.sampling_timesteps(model.schedule.steps, n_steps)
  prev = np.concatenate([times[1:], [-1]]).astype(np.int32)
  rng, start = jax.random.split(rng)
  x = jax.random.normal(start, (caption_tokens.shape[0], n_patches, patch_dim), jnp.float32)
  scale = jnp.float32(guidance_scale)
  for t, t_prev in zip(times, prev):
    rng, key = jax.random.split(rng)
    x = _denoise_step(model, layout, x, jnp.int32(t), jnp.int32(t_prev), key, scale, method=method, clip=clip)
  return x
