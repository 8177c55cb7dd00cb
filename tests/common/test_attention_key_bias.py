"""The per-key attention bias (`key_bias`, common.nn.attention) against a slow numpy softmax written out here:
causal with packed segments, the blockwise path, bidirectional layers, hidden keys (-inf); None equals a
zero bias; and the dense LM's cached decode with the bias equals its full forward with it, ring buffers
included."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.configs.base import dense_model
from common.models.dense_lm import DenseLM
from common.nn.attention import Attention, blockwise_causal_attention

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def _reference(q, k, v, segments, bias, causal):
  """Loops over rows, heads and queries: softmax_j(q_i . k_j / sqrt(d) + bias_j) over the keys j of query i's
  segment (j <= i when causal), in float64."""
  q, k, v, bias = (np.asarray(a, np.float64) for a in (q, k, v, bias))
  batch, length, heads, dim = q.shape
  group = heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      for i in range(length):
        keys = [j for j in range(length) if segments[b, j] == segments[b, i] and (j <= i or not causal)]
        scores = np.array([q[b, i, h] @ k[b, j, h // group] / math.sqrt(dim) + bias[b, j] for j in keys])
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[b, i, h] = sum(w * v[b, j, h // group] for w, j in zip(weights, keys))
  return out


def _inputs(seed, length):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(2, length, HEADS, HEAD_DIM)).astype(np.float32)
  k = rng.normal(size=(2, length, KV_HEADS, HEAD_DIM)).astype(np.float32)
  v = rng.normal(size=(2, length, KV_HEADS, HEAD_DIM)).astype(np.float32)
  segments = np.sort(rng.integers(1, 3, (2, length)), axis=1).astype(np.int32)
  bias = rng.normal(scale=2.0, size=(2, length)).astype(np.float32)
  bias[:, 1::3] = -np.inf  # hidden keys (never a segment's first token, so every query sees one key)
  bias[segments != np.roll(segments, 1, axis=1)] = 0.0
  bias[:, 0] = 0.0
  return q, k, v, segments, bias


@pytest.mark.parametrize("length,block", [(12, 128), (37, 8)])
def test_causal_attention_with_key_bias_matches_numpy(length, block):
  """One block and several (the blockwise path slices the bias with the keys)."""
  q, k, v, segments, bias = _inputs(length, length)
  got = blockwise_causal_attention(*map(jnp.asarray, (q, k, v, segments)), key_bias=jnp.asarray(bias), block=block)
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, segments, bias, True), atol=1e-5)


def test_bidirectional_attention_module_with_key_bias_matches_numpy():
  """`causal=False` (an encoder layer): every key of the segment, before and after the query, with its bias."""
  d_model, length = 16, 10
  attn = Attention(d_model, HEADS, KV_HEADS, HEAD_DIM, rngs=nnx.Rngs(params=0), causal=False)
  _, _, _, segments, bias = _inputs(3, length)
  x = np.random.default_rng(4).normal(size=(2, length, d_model)).astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(length), (2, length))
  q, k, v = attn._qkv(jnp.asarray(x), positions)  # pylint: disable=protected-access
  want = _reference(q, k, v, segments, bias, False).reshape(2, length, -1) @ np.asarray(attn.o.kernel[...])
  got = attn(jnp.asarray(x), positions, jnp.asarray(segments), jnp.asarray(bias))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  with pytest.raises(ValueError, match="no cached"):
    attn.decode(jnp.asarray(x[:, :1]), positions[:, :1], jnp.asarray(segments[:, :1]), None)
  with pytest.raises(ValueError, match="window"):
    Attention(d_model, HEADS, KV_HEADS, HEAD_DIM, rngs=nnx.Rngs(params=0), causal=False, window=4)


def test_no_bias_equals_a_zero_bias_and_a_bias_changes_the_output():
  attn = Attention(16, HEADS, KV_HEADS, HEAD_DIM, rngs=nnx.Rngs(params=1), window=5)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 20, 16)), jnp.float32)
  positions, segments = jnp.broadcast_to(jnp.arange(20), (2, 20)), jnp.ones((2, 20), jnp.int32)
  plain = np.asarray(attn(x, positions, segments))
  np.testing.assert_allclose(np.asarray(attn(x, positions, segments, jnp.zeros((2, 20)))), plain, atol=1e-6)
  biased = np.asarray(attn(x, positions, segments, jnp.linspace(-3, 0, 20)[None].repeat(2, 0)))
  assert np.abs(biased - plain)[:, 1:].min() > 1e-4  # every query that sees two keys moves


def _model(window, scan=False):
  cfg = dense_model(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, window=window,
                    scan_layers=scan)
  return DenseLM(cfg, rngs=nnx.Rngs(params=7))


@nnx.jit
def _decode(model, tokens, positions, segments, caches, bias):
  return model.decode(tokens, positions, segments, caches, key_bias=bias)


def _bias(length, seed=0):
  rng = np.random.default_rng(seed)
  bias = np.log(rng.uniform(0.05, 1.0, (2, length))).astype(np.float32)
  bias[:, 2:length:4] = -np.inf
  return jnp.asarray(bias)


@pytest.mark.parametrize("window,prefill", [(0, 5), (4, 3), (4, 6)])
def test_dense_lm_decode_with_key_bias_equals_the_full_forward(window, prefill):
  """Prefill then one token at a time with the bias over the row's tokens; (4, 6): a ring buffer of 4 slots,
  a prompt longer than it (the side-by-side path), then wrapping steps."""
  model, length = _model(window), 14
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, length)), jnp.int32)
  positions, segments = jnp.broadcast_to(jnp.arange(length), tokens.shape), jnp.ones_like(tokens)
  bias = _bias(length)
  full = np.asarray(model(tokens, key_bias=bias))
  assert np.abs(full - np.asarray(model(tokens))).max() > 1e-3
  caches = model.init_cache(2, length)
  logits, caches = _decode(model, tokens[:, :prefill], positions[:, :prefill], segments[:, :prefill], caches, bias)
  out = [np.asarray(logits)]
  for t in range(prefill, length):
    logits, caches = _decode(model, tokens[:, t:t + 1], positions[:, t:t + 1], segments[:, t:t + 1], caches, bias)
    out.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(out, axis=1), full, atol=1e-5, rtol=1e-5)


def test_scanned_layers_take_the_bias_as_the_unrolled_ones():
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 9)), jnp.int32)
  bias = _bias(9, seed=3)
  np.testing.assert_allclose(np.asarray(_model(0, scan=True)(tokens, key_bias=bias)),
                             np.asarray(_model(0)(tokens, key_bias=bias)), atol=1e-5)
