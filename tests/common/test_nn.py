"""The shared NNX layers (common.nn), each checked against a slow reference written here in plain numpy
loops, independently of the implementation."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.nn import (Attention, Embed, RMSNorm, SwiGLU, apply_rope, attention_mask, dot_product_attention,
                       rope_frequencies)


def _rng(seed=0):
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------- masks

def _mask_reference(q_seg, kv_seg, causal, window):
  """Loop over every (batch, query, key): same segment id, and key not after the query (the queries are
  the last q_len positions of the keys), and fewer than `window` positions back."""
  b, lq = q_seg.shape
  lk = kv_seg.shape[1]
  out = np.zeros((b, 1, lq, lk), bool)
  for n in range(b):
    for i in range(lq):
      qpos = i + (lk - lq)
      for j in range(lk):
        ok = q_seg[n, i] == kv_seg[n, j]
        if causal:
          ok = ok and j <= qpos
        if window:
          ok = ok and qpos - j < window
        out[n, 0, i, j] = ok
  return out


# Two rows of packed documents ending in padding (segment id 0).
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0],
                     [1, 1, 1, 1, 1, 1, 2, 2, 2, 0]], np.int32)


@pytest.mark.parametrize("causal,window", [(True, 0), (False, 0), (True, 3), (False, 2)])
def test_attention_mask_matches_loop(causal, window):
  got = np.asarray(attention_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS), causal=causal, window=window))
  assert got.shape == (2, 1, 10, 10) and got.dtype == bool
  np.testing.assert_array_equal(got, _mask_reference(SEGMENTS, SEGMENTS, causal, window))


def test_attention_mask_real_tokens_never_see_padding_or_other_documents():
  got = np.asarray(attention_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS)))[:, 0]
  for n in range(SEGMENTS.shape[0]):
    for i in np.flatnonzero(SEGMENTS[n] > 0):
      seen = np.flatnonzero(got[n, i])
      assert set(SEGMENTS[n, seen]) == {SEGMENTS[n, i]}
      assert got[n, i, i]  # every token sees itself: no fully masked row


@pytest.mark.parametrize("causal,window", [(True, 0), (True, 4), (False, 0)])
def test_attention_mask_queries_shorter_than_keys(causal, window):
  """Queries are the last q_len positions of the keys (decoding with a cache)."""
  q_seg = SEGMENTS[:, -4:]
  got = np.asarray(attention_mask(jnp.asarray(q_seg), jnp.asarray(SEGMENTS), causal=causal, window=window))
  assert got.shape == (2, 1, 4, 10)
  np.testing.assert_array_equal(got, _mask_reference(q_seg, SEGMENTS, causal, window))


# ------------------------------------------------------------------------------------------- attention

def _attention_reference(q, k, v, mask):
  """Per batch row and query head: explicit softmax over keys of the kv head that serves the query head
  (query heads split into kv_heads consecutive groups)."""
  b, lq, h, d = q.shape
  kvh = k.shape[2]
  group = h // kvh
  out = np.zeros((b, lq, h, d))
  for n in range(b):
    for head in range(h):
      kh = head // group
      scores = q[n, :, head, :].astype(np.float64) @ k[n, :, kh, :].astype(np.float64).T / math.sqrt(d)
      if mask is not None:
        scores = np.where(mask[n, 0], scores, -np.inf)
      scores = scores - scores.max(axis=-1, keepdims=True)
      p = np.exp(scores)
      p = p / p.sum(axis=-1, keepdims=True)
      out[n, :, head, :] = p @ v[n, :, kh, :]
  return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_dot_product_attention_gqa_matches_per_head_loop(kv_heads):
  rng = _rng(kv_heads)
  b, l, h, d = 2, 10, 4, 8
  q = rng.normal(size=(b, l, h, d)).astype(np.float32)
  k = rng.normal(size=(b, l, kv_heads, d)).astype(np.float32)
  v = rng.normal(size=(b, l, kv_heads, d)).astype(np.float32)
  mask = _mask_reference(SEGMENTS, SEGMENTS, True, 0)
  got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
  assert got.shape == (b, l, h, d)
  np.testing.assert_allclose(np.asarray(got), _attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_dot_product_attention_without_mask_attends_everywhere():
  rng = _rng(7)
  q = rng.normal(size=(1, 5, 4, 6)).astype(np.float32)
  k = rng.normal(size=(1, 7, 2, 6)).astype(np.float32)
  v = rng.normal(size=(1, 7, 2, 6)).astype(np.float32)
  got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None)
  np.testing.assert_allclose(np.asarray(got), _attention_reference(q, k, v, None), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ RoPE

def _rope_reference(x, positions, theta):
  """Rotates each pair (x[i], x[i + d/2]) by the angle position * theta^(-2i/d)."""
  b, l, h, d = x.shape
  half = d // 2
  out = np.zeros(x.shape)
  for n in range(b):
    for t in range(l):
      for i in range(half):
        angle = positions[n, t] * theta ** (-2.0 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        a, bb = x[n, t, :, i].astype(np.float64), x[n, t, :, i + half].astype(np.float64)
        out[n, t, :, i] = a * c - bb * s
        out[n, t, :, i + half] = bb * c + a * s
  return out


def test_apply_rope_rotates_pairs_by_position_times_frequency():
  rng = _rng(1)
  x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4, 5], [7, 0, 1, 2, 30, 100]])
  got = apply_rope(jnp.asarray(x), jnp.asarray(positions), rope_frequencies(8, 10000.0))
  assert got.shape == x.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _rope_reference(x, positions, 10000.0), rtol=1e-5, atol=1e-5)


def test_rope_dot_products_depend_only_on_relative_position():
  rng = _rng(2)
  d = 16
  q = rng.normal(size=(1, 1, 1, d)).astype(np.float32)
  k = rng.normal(size=(1, 1, 1, d)).astype(np.float32)
  inv = rope_frequencies(d, 10000.0)

  def score(m, n):
    qm = apply_rope(jnp.asarray(q), jnp.array([[m]]), inv)
    kn = apply_rope(jnp.asarray(k), jnp.array([[n]]), inv)
    return float(jnp.sum(qm * kn))

  for delta in (0, 3, 11):
    scores = [score(base + delta, base) for base in (0, 5, 40, 200)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
  assert abs(score(3, 0) - score(0, 0)) > 1e-3  # and it does depend on the distance


def test_rope_frequencies_without_scaling_are_theta_powers():
  got = rope_frequencies(12, 500000.0)
  expected = [500000.0 ** (-2 * i / 12) for i in range(6)]
  assert got.shape == (6,)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_rope_frequencies_llama31_scaling_three_bands():
  """Llama 3.1: wavelength 2*pi/f shorter than original_max_len/high_freq_factor: unchanged; longer than
  original_max_len/low_freq_factor: divided by factor; in between: (1-s) f/factor + s f with
  s = (original_max_len/wavelength - low) / (high - low)."""
  head_dim, theta = 128, 500000.0
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192)
  got = rope_frequencies(head_dim, theta, scaling)
  base = [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]
  bands = {"high": 0, "mid": 0, "low": 0}
  for i, f in enumerate(base):
    wavelength = 2 * math.pi / f
    if wavelength < 8192 / 4.0:
      want = f
      bands["high"] += 1
    elif wavelength > 8192 / 1.0:
      want = f / 8.0
      bands["low"] += 1
    else:
      s = (8192 / wavelength - 1.0) / (4.0 - 1.0)
      assert 0.0 <= s <= 1.0
      want = (1 - s) * f / 8.0 + s * f
      bands["mid"] += 1
    assert got[i] == pytest.approx(want, rel=1e-6), (i, wavelength)
  assert min(bands.values()) > 0, bands  # the check covered all three bands
  assert got[0] == pytest.approx(1.0)  # the fastest frequency is untouched
  assert got[-1] == pytest.approx(base[-1] / 8.0, rel=1e-6)  # the slowest is divided by the factor


# ------------------------------------------------------------------------------------------ norms, MLP

def test_rmsnorm_matches_numpy():
  rng = _rng(3)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3.0
  scale = rng.normal(size=(16,)).astype(np.float32)
  norm = RMSNorm(16, eps=1e-5)
  norm.scale.set_value(jnp.asarray(scale))
  want = np.zeros(x.shape)
  for idx in np.ndindex(*x.shape[:-1]):
    row = x[idx].astype(np.float64)
    want[idx] = row / math.sqrt(np.mean(row ** 2) + 1e-5) * scale
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)


def test_rmsnorm_bfloat16_output_keeps_f32_statistics():
  rng = _rng(4)
  x = rng.normal(size=(3, 32)).astype(np.float32) * 100.0
  out = RMSNorm(32, dtype=jnp.bfloat16)(jnp.asarray(x))
  assert out.dtype == jnp.bfloat16
  want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2, atol=1e-2)


def test_swiglu_matches_numpy():
  rng = _rng(5)
  mlp = SwiGLU(8, 24, rngs=nnx.Rngs(params=0))
  wg, wu, wd = (np.asarray(m.kernel[...], np.float64) for m in (mlp.gate, mlp.up, mlp.down))
  assert wg.shape == (8, 24) and wu.shape == (8, 24) and wd.shape == (24, 8)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  want = np.zeros((2, 3, 8))
  for idx in np.ndindex(2, 3):
    g, u = x[idx] @ wg, x[idx] @ wu
    want[idx] = (g / (1 + np.exp(-g)) * u) @ wd
  np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- embeddings

def test_embed_looks_up_rows():
  emb = Embed(11, 6, rngs=nnx.Rngs(params=0))
  table = np.asarray(emb.embedding[...])
  ids = np.array([[0, 3, 10], [10, 10, 1]])
  np.testing.assert_array_equal(np.asarray(emb(jnp.asarray(ids))), table[ids])


def test_embed_attend_is_x_times_table_transposed():
  rng = _rng(6)
  emb = Embed(11, 6, rngs=nnx.Rngs(params=0))
  table = np.asarray(emb.embedding[...], np.float64)
  x = rng.normal(size=(2, 4, 6)).astype(np.float32)
  want = np.zeros((2, 4, 11))
  for idx in np.ndindex(2, 4):
    for v in range(11):
      want[idx + (v,)] = sum(x[idx][c] * table[v, c] for c in range(6))
  got = emb.attend(jnp.asarray(x))
  assert got.shape == (2, 4, 11)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- the attention module

def test_attention_module_matches_numpy_composition():
  """Projections, RoPE on q and k, the segment/causal/window mask, GQA softmax, output projection."""
  d_model, heads, kv_heads, head_dim, window = 16, 4, 2, 8, 3
  attn = Attention(d_model, heads, kv_heads, head_dim, rngs=nnx.Rngs(params=0), window=window)
  wq, wk, wv, wo = (np.asarray(m.kernel[...], np.float64) for m in (attn.q, attn.k, attn.v, attn.o))
  assert wq.shape == (d_model, heads, head_dim) and wk.shape == (d_model, kv_heads, head_dim)
  assert wo.shape == (heads * head_dim, d_model)
  rng = _rng(8)
  x = rng.normal(size=(2, 10, d_model)).astype(np.float32)
  positions = np.stack([np.array([0, 1, 2, 0, 1, 2, 3, 0, 0, 0]), np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 0])])
  q = np.einsum("bld,dhk->blhk", x, wq)
  k = np.einsum("bld,dhk->blhk", x, wk)
  v = np.einsum("bld,dhk->blhk", x, wv)
  q, k = _rope_reference(q, positions, 10000.0), _rope_reference(k, positions, 10000.0)
  ctx = _attention_reference(q, k, v, _mask_reference(SEGMENTS, SEGMENTS, True, window))
  want = ctx.reshape(2, 10, heads * head_dim) @ wo
  got = attn(jnp.asarray(x), jnp.asarray(positions), jnp.asarray(SEGMENTS))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_attention_module_rejects_heads_not_multiple_of_kv_heads():
  with pytest.raises(ValueError, match="n_kv_heads"):
    Attention(16, 4, 3, 4, rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize("length,window,block", [(300, 0, 128), (512, 0, 128), (300, 70, 64), (257, 200, 128),
                                                 (64, 0, 128)])
def test_blockwise_causal_attention_equals_full_masked_attention(length, window, block):
  from common.nn.attention import blockwise_causal_attention
  rng = np.random.default_rng(length + window)
  q = jnp.asarray(rng.normal(size=(2, length, 4, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, length, 2, 16)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, length, 2, 16)), jnp.float32)
  segments = jnp.asarray(np.sort(rng.integers(0, 3, (2, length)), axis=1), jnp.int32)
  blocked = blockwise_causal_attention(q, k, v, segments, window=window, block=block)
  full = dot_product_attention(q, k, v, attention_mask(segments, segments, window=window))
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=2e-6)
