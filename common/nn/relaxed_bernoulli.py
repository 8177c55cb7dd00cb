"""Differentiable binary masks: the relaxed Bernoulli (Gumbel-sigmoid; Maddison et al. 2017, Jang et al. 2017)
and the hard concrete (Louizos et al. 2018, "Learning Sparse Neural Networks through L0 Regularization"), plus
the KL of a Bernoulli mask to a Bernoulli prior, the compression term of information-bottleneck extractors
(Paranjape et al. 2020). The samplers take uniform noise rather than a key, so that a caller whose noise is a
pure function of (seed, step) keeps its runs reproducible and resumable."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Louizos et al.'s stretch interval (gamma, zeta): the stretched sigmoid is clipped to [0, 1], so exact zeros
# and ones have positive probability.
HARD_CONCRETE_STRETCH = (-0.1, 1.1)
_TINY = 1e-6


def logistic_noise(uniform: jax.Array) -> jax.Array:
  """log u - log(1 - u): a standard logistic sample from u ~ U(0, 1) (u clipped away from 0 and 1)."""
  u = jnp.clip(uniform, _TINY, 1.0 - _TINY)
  return jnp.log(u) - jnp.log1p(-u)


def gumbel_sigmoid(logits: jax.Array, uniform: jax.Array, temperature: float) -> jax.Array:
  """A relaxed Bernoulli sample in (0, 1) with P(sample > 1/2) = sigmoid(logits) at any temperature."""
  return jax.nn.sigmoid((logits + logistic_noise(uniform)) / temperature)


def hard_concrete(logits: jax.Array, uniform: jax.Array, temperature: float,
                  stretch: tuple[float, float] = HARD_CONCRETE_STRETCH) -> jax.Array:
  """A hard-concrete sample in [0, 1]: the relaxed sample stretched to (gamma, zeta) and clipped."""
  low, high = stretch
  return jnp.clip(gumbel_sigmoid(logits, uniform, temperature) * (high - low) + low, 0.0, 1.0)


def hard_concrete_keep_probability(logits: jax.Array, temperature: float,
                                   stretch: tuple[float, float] = HARD_CONCRETE_STRETCH) -> jax.Array:
  """P(hard-concrete sample > 0) = sigmoid(logits - temperature * log(-gamma / zeta)) (Louizos et al. eq. 12)."""
  low, high = stretch
  return jax.nn.sigmoid(logits - temperature * jnp.log(-low / high))


def bernoulli_kl(p: jax.Array, prior: float) -> jax.Array:
  """KL(Bernoulli(p) || Bernoulli(prior)) elementwise, in nats; 0 log 0 = 0."""
  p = jnp.clip(p, 0.0, 1.0)
  xlogy = lambda x, y: jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, x, 1.0) / y), 0.0)
  return xlogy(p, prior) + xlogy(1.0 - p, 1.0 - prior)
