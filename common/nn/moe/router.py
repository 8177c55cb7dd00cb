"""The router of a mixture-of-experts layer and the statistics its losses and metrics are made of.

The router is a bias-free linear map to one logit per expert, computed in float32 whatever the layer's
dtype (Fedus et al. 2021, "Switch Transformers", sec. 2.4: selective precision keeps routing stable).

Its randomness (noisy gating, second-expert sampling) is for training only: the layer draws from
`common.nn.training_rng` (a key the train step derives from the seed and the step number, so a resumed run
draws the same noise as an uninterrupted one); called outside a train step (evaluation, scoring) it routes
without noise.

The statistics take an optional token mask [S] (True = real token) and are then means over the real tokens
of the group only. fairseq's `top2gating` drops padding from the first-choice counts but still divides
both the counts and the mean gate by all S tokens of the group; we exclude padding from both, as the
study's evaluation needs (a padded row must not move any statistic).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class Router(nnx.Module):
  """x [..., d_model] -> logits [..., n_experts] in f32, with optional Gaussian noise on the logits during
  training (Shazeer et al. 2017, "Outrageously Large Neural Networks", noisy top-k gating, eq. 4, with a
  fixed standard deviation instead of a learned one)."""

  def __init__(self, d_model: int, n_experts: int, *, rngs: nnx.Rngs, noise_std: float = 0.0):
    std = 1.0 / math.sqrt(d_model)
    w = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (d_model, n_experts), jnp.float32)
    self.kernel = nnx.Param(w, axes=("embed", None))
    self.noise_std = float(noise_std)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    logits = jnp.dot(x.astype(jnp.float32), self.kernel[...], precision=jax.lax.Precision.HIGHEST)
    if rng is not None and self.noise_std > 0:
      logits = logits + self.noise_std * jax.random.normal(rng, logits.shape, jnp.float32)
    return logits


def _mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean over the leading (token) axis, over the real tokens only when a mask is given (0 if none is real)."""
  if mask is None:
    return jnp.mean(values, axis=0)
  m = mask.astype(values.dtype).reshape(mask.shape + (1,) * (values.ndim - 1))
  return jnp.sum(values * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)


def balance_loss(probs: jax.Array, first_choice: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """fairseq / GShard auxiliary load-balancing loss of one group: E^2 * mean_e(f_e * m_e), with f_e the
  fraction of tokens whose first choice is expert e and m_e the mean gate probability of e (GShard sec. 2.2,
  eq. 4's differentiable approximation; Switch eq. 4 up to the 1/E of the mean). Equals 1 when the router
  is uniform, and grows as routing concentrates on fewer experts. probs [S, E], first_choice [S] int."""
  n_experts = probs.shape[-1]
  fraction_routed = _mean(jax.nn.one_hot(first_choice, n_experts, dtype=jnp.float32), mask)
  mean_gate = _mean(probs, mask)
  return n_experts ** 2 * jnp.mean(fraction_routed * mean_gate)


def z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Router z-loss (Zoph et al. 2022, "ST-MoE", arXiv 2202.08906, eq. 5): mean squared log-partition,
  which keeps router logits small. logits [S, E]."""
  return _mean(jax.nn.logsumexp(logits, axis=-1) ** 2, mask)


def entropy(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean entropy (nats) of the routing distributions [S, E]; log(E) for a uniform router."""
  return _mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-20)), axis=-1), mask)
