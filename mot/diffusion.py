"""Gaussian diffusion for Transfusion's image patches (Zhou et al. 2024, arXiv 2408.11039, sec. 2.2): noise
schedules, the forward process q(x_t | x_0), the noise-prediction loss and the DDPM / DDIM reverse steps.

Timesteps are 0-based: t in [0, T); `alpha_bar[t]` = prod_{s <= t} (1 - beta_s), so t = 0 is the least
noisy step (alpha_bar near 1) and t = T - 1 the noisiest (alpha_bar near 0).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")


class Schedule(NamedTuple):
  """betas and alpha_bar [T] (float32, host arrays: compile-time constants)."""
  betas: np.ndarray
  alpha_bar: np.ndarray

  @property
  def steps(self) -> int:
    return self.betas.shape[0]


def linear_schedule(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """Ho et al. 2020 (DDPM, sec. 4): betas linear from 1e-4 to 0.02 over T = 1000 steps, rescaled by
  1000 / T for other T so that alpha_bar[T - 1] stays near 0."""
  scale = 1000.0 / steps
  betas = np.linspace(scale * beta_start, min(scale * beta_end, 0.999), steps, dtype=np.float64)
  return Schedule(betas.astype(np.float32), np.cumprod(1.0 - betas).astype(np.float32))


def cosine_schedule(steps: int, offset: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """Nichol & Dhariwal 2021 (Improved DDPM, eq. 17): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(pi/2 (t/T + s)
  / (1 + s)), betas = 1 - alpha_bar(t+1) / alpha_bar(t) clipped at 0.999 (the noisiest steps)."""
  f = lambda t: np.cos((t / steps + offset) / (1 + offset) * math.pi / 2) ** 2
  t = np.arange(steps + 1, dtype=np.float64)
  betas = np.minimum(1.0 - f(t[1:]) / f(t[:-1]), max_beta)
  return Schedule(betas.astype(np.float32), np.cumprod(1.0 - betas).astype(np.float32))


@functools.lru_cache(maxsize=None)
def make_schedule(name: str, steps: int) -> Schedule:
  if name == "linear":
    return linear_schedule(steps)
  if name == "cosine":
    return cosine_schedule(steps)
  raise ValueError(f"unknown noise schedule '{name}' (known: {', '.join(SCHEDULES)})")


def _at(table: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
  """table[t] broadcast against `like` (t has like's leading dims)."""
  values = jnp.asarray(table)[t]
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).astype(like.dtype)


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, schedule: Schedule) -> jax.Array:
  """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4)."""
  ab = _at(schedule.alpha_bar, t, x0)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def epsilon_loss(predicted_noise: jax.Array, noise: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum over masked positions of the mean squared error over the last axis, number of masked positions):
  the simplified DDPM objective ||eps - eps_theta(x_t, t)||^2 (Ho et al. 2020, eq. 14), as sums."""
  err = jnp.mean(jnp.square(predicted_noise.astype(jnp.float32) - noise.astype(jnp.float32)), axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(err * mask), jnp.sum(mask)


def predicted_x0(x_t: jax.Array, eps: jax.Array, ab_t: jax.Array, clip: bool) -> jax.Array:
  """x_0 implied by a noise prediction: (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t); clipped to the data range
  [-1, 1] when `clip`."""
  x0 = (x_t - jnp.sqrt(1.0 - ab_t) * eps) / jnp.sqrt(ab_t)
  return jnp.clip(x0, -1.0, 1.0) if clip else x0


def ddim_step(x_t, eps, t, t_prev, schedule: Schedule, *, eta: float = 0.0, noise=None, clip: bool = True):
  """x_{t_prev} from x_t (Song et al. 2021, DDIM, eq. 12): sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev -
  sigma^2) eps + sigma z, sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev). t_prev < 0
  means the end: x0_hat. eta = 0 is deterministic; eta = 1 is DDPM's posterior sample."""
  ab_t = _at(schedule.alpha_bar, t, x_t)
  x0 = predicted_x0(x_t, eps, ab_t, clip)
  if clip:  # the noise consistent with the clipped x0
    eps = (x_t - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1.0 - ab_t)
  ab_prev = jnp.where(jnp.asarray(t_prev) >= 0, _at(schedule.alpha_bar, jnp.maximum(t_prev, 0), x_t), 1.0)
  sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t)) * jnp.sqrt(1.0 - ab_t / ab_prev)
  out = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma ** 2, 0.0)) * eps
  if noise is not None:
    out = out + sigma * noise
  return out


def ddpm_step(x_t, eps, t, t_prev, schedule: Schedule, *, noise=None, clip: bool = True):
  """A sample of the posterior q(x_{t_prev} | x_t, x0_hat) (Ho et al. 2020, eq. 6-7, with the step from t
  to t_prev taken as one: beta = 1 - ab_t / ab_prev): mean = sqrt(ab_prev) beta / (1 - ab_t) x0_hat +
  sqrt(1 - beta) (1 - ab_prev) / (1 - ab_t) x_t, variance beta (1 - ab_prev) / (1 - ab_t). t_prev < 0:
  the mean of the last step, x0_hat."""
  ab_t = _at(schedule.alpha_bar, t, x_t)
  x0 = predicted_x0(x_t, eps, ab_t, clip)
  ab_prev = jnp.where(jnp.asarray(t_prev) >= 0, _at(schedule.alpha_bar, jnp.maximum(t_prev, 0), x_t), 1.0)
  beta = 1.0 - ab_t / ab_prev
  mean = (jnp.sqrt(ab_prev) * beta * x0 + jnp.sqrt(1.0 - beta) * (1.0 - ab_prev) * x_t) / (1.0 - ab_t)
  if noise is None:
    return mean
  return mean + jnp.sqrt(beta * (1.0 - ab_prev) / (1.0 - ab_t)) * noise


def sampling_timesteps(steps: int, n_steps: int) -> np.ndarray:
  """n_steps timesteps from T - 1 down to 0, evenly spaced (DDIM's subsequence, Song et al. 2021 sec. 4.2)."""
  if not 1 <= n_steps <= steps:
    raise ValueError(f"n_steps must be in [1, {steps}], got {n_steps}")
  return np.round(np.linspace(steps - 1, 0, n_steps)).astype(np.int32)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in DDPM): t [...] -> [..., dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  return jnp.pad(emb, [(0, 0)] * t.ndim + [(0, dim - 2 * half)])
