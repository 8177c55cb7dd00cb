"""Diffusion for Transfusion (mot.diffusion, mot.transfusion.sample_images): the schedules' closed forms, the
noise-prediction loss at t = 0 and t = T as the schedule says, DDPM and DDIM steps that recover x_0 from an
exact noise prediction, and the caption-conditioned sampler with classifier-free guidance."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mot import diffusion
from mot.configs.base import mot_model
from mot.transfusion import TransfusionLM, _caption_layout, sample_images

T = 1000


def test_linear_schedule_is_ho_et_al():
  s = diffusion.linear_schedule(T)
  np.testing.assert_allclose(s.betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(s.alpha_bar, np.cumprod(1 - np.linspace(1e-4, 0.02, T)), rtol=1e-5)


def test_cosine_schedule_follows_its_closed_form_until_the_beta_clip():
  s = diffusion.cosine_schedule(T)
  f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
  want = np.array([f(t + 1) / f(0) for t in range(T)])
  unclipped = s.betas < 0.999
  np.testing.assert_allclose(s.alpha_bar[unclipped], want[unclipped], rtol=1e-4, atol=1e-7)
  assert unclipped[: T - 1].all() and np.all(np.diff(s.alpha_bar) < 0)


@pytest.mark.parametrize("name", diffusion.SCHEDULES)
def test_alpha_bar_goes_from_almost_clean_to_almost_pure_noise(name):
  s = diffusion.make_schedule(name, T)
  assert s.alpha_bar[0] > 0.999 and s.alpha_bar[-1] < 1e-4


def _images(seed=0, shape=(4, 16, 12)):
  rng = np.random.default_rng(seed)
  x0 = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  noise = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return x0, noise


@pytest.mark.parametrize("name", diffusion.SCHEDULES)
def test_noise_loss_at_t0_and_tT_behaves_as_the_schedule_says(name):
  """The loss of predicting eps_hat = x_t (the input itself) is mean((sqrt(ab) x0 + (sqrt(1 - ab) - 1)
  eps)^2) for ab = alpha_bar[t]: near zero at t = T - 1, where x_t is pure noise, and near mean((x0 -
  eps)^2) at t = 0, where x_t is the clean image; the exact predictor has loss 0 at every t."""
  s = diffusion.make_schedule(name, T)
  x0, noise = _images()
  mask = jnp.ones(x0.shape[:2])
  for t, close_to in ((T - 1, 0.0), (0, float(jnp.mean((x0 - noise) ** 2)))):
    timesteps = jnp.full(x0.shape[:2], t)
    x_t = diffusion.q_sample(x0, timesteps, noise, s)
    ab = float(s.alpha_bar[t])
    total, count = diffusion.epsilon_loss(x_t, noise, mask)
    want = np.mean((math.sqrt(ab) * np.asarray(x0) + (math.sqrt(1 - ab) - 1) * np.asarray(noise)) ** 2)
    np.testing.assert_allclose(total / count, want, rtol=1e-4, atol=1e-8)
    assert abs(float(total / count) - close_to) < 0.02
    exact, _ = diffusion.epsilon_loss(noise, noise, mask)
    assert float(exact) == 0.0


def test_loss_counts_only_masked_positions():
  x0, noise = _images()
  mask = jnp.zeros(x0.shape[:2]).at[:, 3].set(1.0)
  total, count = diffusion.epsilon_loss(x0, noise, mask)
  assert float(count) == x0.shape[0]
  np.testing.assert_allclose(total, np.sum(np.mean((np.asarray(x0) - np.asarray(noise))[:, 3] ** 2, -1)), rtol=1e-5)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
@pytest.mark.parametrize("name", diffusion.SCHEDULES)
def test_reverse_steps_with_the_exact_noise_recover_the_clean_image(method, name):
  """With eps_theta(x_t, t) the noise that makes x_t from x_0 (its exact value), both samplers land on x_0
  from pure noise in a few strided steps (DDPM's last step is its posterior mean, x0_hat)."""
  s = diffusion.make_schedule(name, T)
  x0, noise = _images(1)
  times = diffusion.sampling_timesteps(T, 10)
  prev = np.concatenate([times[1:], [-1]])
  x = diffusion.q_sample(x0, jnp.full(x0.shape[:2], times[0]), noise, s)
  for i, (t, t_prev) in enumerate(zip(times, prev)):
    ab = float(s.alpha_bar[t])
    eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    if method == "ddim":
      x = diffusion.ddim_step(x, eps, jnp.int32(t), jnp.int32(t_prev), s, clip=False)
    else:
      z = None if t_prev < 0 else jax.random.normal(jax.random.PRNGKey(i), x.shape)
      x = diffusion.ddpm_step(x, eps, jnp.int32(t), jnp.int32(t_prev), s, noise=z, clip=False)
  np.testing.assert_allclose(x, x0, atol=2e-3)


def test_ddpm_posterior_equals_ddim_with_eta_one():
  """Two formulas of the same distribution (Song et al. 2021, sec. 4.1): Ho et al.'s posterior q(x_{t'} |
  x_t, x0_hat) and DDIM's step with eta = 1, given the same noise draw."""
  s = diffusion.cosine_schedule(T)
  x0, eps = _images(2)
  z = jax.random.normal(jax.random.PRNGKey(3), x0.shape)
  x_t = diffusion.q_sample(x0, jnp.full(x0.shape[:2], 600), eps, s)
  eps_hat = eps + 0.1 * z[::-1]
  a = diffusion.ddpm_step(x_t, eps_hat, jnp.int32(600), jnp.int32(450), s, noise=z)
  b = diffusion.ddim_step(x_t, eps_hat, jnp.int32(600), jnp.int32(450), s, eta=1.0, noise=z)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sampling_timesteps_run_from_T_minus_1_down_to_0():
  times = diffusion.sampling_timesteps(T, 5)
  assert times[0] == T - 1 and times[-1] == 0 and np.all(np.diff(times) < 0)
  with pytest.raises(ValueError):
    diffusion.sampling_timesteps(T, 0)


@pytest.fixture(scope="module")
def transfusion():
  cfg = mot_model(vocab_size=384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=48, setting="transfusion",
                  patch_dim=12, patches_per_image=4, diffusion=dict(steps=100))
  return nnx.jit(lambda: TransfusionLM(cfg, rngs=nnx.Rngs(params=0)))()


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sampler_returns_one_image_per_caption_and_depends_on_the_caption(transfusion, method):
  captions = jnp.asarray([[0, 0, 40, 41, 42], [50, 51, 52, 53, 54]], jnp.int32)  # left-padded with 0
  images = sample_images(transfusion, captions, 4, method, jax.random.PRNGKey(0))
  assert images.shape == (2, 4, 12) and bool(jnp.all(jnp.isfinite(images)))
  again = sample_images(transfusion, captions, 4, method, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(images, again)  # a pure function of its inputs and key
  swapped = sample_images(transfusion, captions[::-1], 4, method, jax.random.PRNGKey(0))
  if method == "ddim":  # same start noise per row, other caption: another image
    assert not np.allclose(swapped[0], images[0], atol=1e-4)


def test_left_padding_does_not_change_the_image(transfusion):
  short = jnp.asarray([[40, 41, 42]], jnp.int32)
  padded = jnp.asarray([[0, 0, 40, 41, 42]], jnp.int32)
  a = sample_images(transfusion, short, 3, "ddim", jax.random.PRNGKey(1))
  b = sample_images(transfusion, padded, 3, "ddim", jax.random.PRNGKey(1))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_guidance_scale_one_is_the_conditional_sampler_and_zero_the_empty_caption_one(transfusion):
  captions = jnp.asarray([[0, 0, 40, 41, 42], [50, 51, 52, 53, 54]], jnp.int32)
  plain = sample_images(transfusion, captions, 3, "ddim", jax.random.PRNGKey(2))
  np.testing.assert_array_equal(sample_images(transfusion, captions, 3, "ddim", jax.random.PRNGKey(2),
                                              guidance_scale=1.0), plain)
  unconditional = sample_images(transfusion, jnp.zeros_like(captions), 3, "ddim", jax.random.PRNGKey(2))
  np.testing.assert_allclose(sample_images(transfusion, captions, 3, "ddim", jax.random.PRNGKey(2),
                                           guidance_scale=0.0), unconditional, rtol=1e-5, atol=1e-5)


def test_a_guided_step_takes_eps_uncond_plus_w_times_the_difference(transfusion):
  """One DDIM step from t = T - 1 (unclipped: x0_hat itself) by hand: the model on the caption and on the
  empty caption, eps = eps_u + w (eps_c - eps_u) (Ho & Salimans 2022, eq. 6)."""
  model, w = transfusion, 3.0
  captions = jnp.asarray([[0, 40, 41], [50, 51, 52]], jnp.int32)
  got = sample_images(model, captions, 1, "ddim", jax.random.PRNGKey(4), clip=False, guidance_scale=w)
  x = jax.random.normal(jax.random.split(jax.random.PRNGKey(4))[1], got.shape, jnp.float32)
  t = model.schedule.steps - 1

  @jax.jit
  def eps_of(tokens):
    inputs, positions, segment_ids, modality, image_ids = _caption_layout(tokens, int(model.cfg.boi_id), 4)
    full = jnp.concatenate([jnp.zeros((2, inputs.shape[1] - 4, 12)), x], axis=1)
    _, eps = model(inputs, positions, segment_ids, modality, image_ids, full, jnp.where(image_ids > 0, t, 0))
    return eps[:, -4:]

  cond, uncond = (np.asarray(eps_of(c), np.float64) for c in (captions, jnp.zeros_like(captions)))
  assert not np.allclose(cond, uncond, atol=1e-4)
  ab = float(model.schedule.alpha_bar[t])
  want = (np.asarray(x, np.float64) - math.sqrt(1 - ab) * (uncond + w * (cond - uncond))) / math.sqrt(ab)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
