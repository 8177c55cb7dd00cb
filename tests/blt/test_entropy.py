"""Next-byte entropies (blt.entropy) against numpy."""
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blt.entropy import entropy_from_logits, next_byte_entropies, to_bits
from common.configs.base import dense_model
from common.models.dense_lm import DenseLM


def _numpy_entropy(logits):
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def test_entropy_matches_numpy_in_nats():
  logits = np.random.default_rng(0).normal(0, 3, (2, 5, 260)).astype(np.float32)
  np.testing.assert_allclose(entropy_from_logits(jnp.asarray(logits)), _numpy_entropy(logits), rtol=1e-5)


def test_uniform_over_bytes_is_eight_bits_and_peaked_is_zero():
  np.testing.assert_allclose(entropy_from_logits(jnp.zeros((3, 256))), math.log(256), rtol=1e-6)
  np.testing.assert_allclose(to_bits(entropy_from_logits(jnp.zeros((256,)))), 8.0, rtol=1e-6)
  peaked = jnp.zeros((256,)).at[7].set(1e4)
  assert float(entropy_from_logits(peaked)) < 1e-6  # no NaN from 0 * log 0


def test_next_byte_entropies_of_a_byte_lm():
  cfg = dense_model(vocab_size=260, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, window=8)
  model = DenseLM(cfg, rngs=nnx.Rngs(params=0))
  x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)), jnp.int32)
  h = next_byte_entropies(model, x)
  assert h.shape == (2, 12)
  np.testing.assert_allclose(h, _numpy_entropy(np.asarray(model(x))), rtol=1e-5)
