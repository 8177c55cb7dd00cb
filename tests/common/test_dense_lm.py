"""Behaviour of the shared dense LM (common.models.dense_lm): causality, packed documents, weight tying,
mixed precision, config validation and windowed attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.config import ConfigError
from common.configs.base import dense_model
from common.models import DenseLM, build_model, validate_model_config

VOCAB = 64


def _cfg(**overrides):
  base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  base.update(overrides)
  return dense_model(**base)


def _model(seed=0, **overrides):
  return DenseLM(_cfg(**overrides), rngs=nnx.Rngs(params=seed))


def _tokens(shape, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, size=shape).astype(np.int32)


# Jitted forward passes: one compilation per (model, shape) instead of op-by-op dispatch.
_run = nnx.jit(lambda model, tokens: model(tokens))
_run_packed = nnx.jit(lambda model, tokens, positions, segment_ids: model(tokens, positions, segment_ids))


def _logits(model, tokens, positions=None, segment_ids=None):
  if positions is None:
    return np.asarray(_run(model, jnp.asarray(tokens)))
  return np.asarray(_run_packed(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)))


def _n_params(model):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_logits_shape_and_dtype():
  logits = _run(_model(), jnp.asarray(_tokens((2, 12))))
  assert logits.shape == (2, 12, VOCAB) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


def test_causal_later_tokens_never_change_earlier_logits():
  model = _model()
  tokens = _tokens((2, 16), seed=1)
  base = _logits(model, tokens)
  for t in (0, 5, 14):
    changed = tokens.copy()
    changed[:, t + 1:] = _tokens((2, 16 - t - 1), seed=100 + t)
    assert (changed[:, t + 1:] != tokens[:, t + 1:]).any()
    out = _logits(model, changed)
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)  # later positions do see them


def test_packed_documents_are_independent():
  """Document B packed after document A (segment ids 1 then 2, positions restarting at 0, padding after)
  gets exactly the logits of B alone."""
  model = _model()
  a, b = _tokens((5,), seed=2), _tokens((7,), seed=3)
  pad = 4
  packed = np.concatenate([a, b, np.zeros(pad, np.int32)])[None]
  segments = np.array([[1] * 5 + [2] * 7 + [0] * pad], np.int32)
  positions = np.array([list(range(5)) + list(range(7)) + [0] * pad], np.int32)
  out = _logits(model, packed, positions, segments)
  alone_b = _logits(model, b[None])
  alone_a = _logits(model, a[None])
  np.testing.assert_allclose(out[0, 5:12], alone_b[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)


def test_tied_and_untied_parameter_counts_differ_by_vocab_times_d_model():
  tied = _n_params(_model(tie_embeddings=True))
  untied = _n_params(_model(tie_embeddings=False))
  assert untied - tied == VOCAB * 32


def test_untied_model_has_its_own_output_projection():
  model = _model(tie_embeddings=False)
  h = model.hidden(jnp.asarray(_tokens((1, 6))))
  want = np.asarray(h) @ np.asarray(model.lm_head.kernel[...])
  np.testing.assert_allclose(np.asarray(model.logits(h)), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_f32_params_and_close_logits():
  tokens = jnp.asarray(_tokens((2, 16), seed=4))
  m32, m16 = _model(seed=3), _model(seed=3, dtype="bfloat16")
  for x in jax.tree.leaves(nnx.state(m16, nnx.Param)):
    assert x.dtype == jnp.float32
  # The same seed gives the same (f32) parameters whatever the compute dtype.
  for x, y in zip(jax.tree.leaves(nnx.state(m32, nnx.Param)), jax.tree.leaves(nnx.state(m16, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  l32, l16 = _run(m32, tokens), _run(m16, tokens)
  assert l16.dtype == jnp.float32
  l32, l16 = np.asarray(l32), np.asarray(l16)
  scale = np.abs(l32).max()
  assert np.abs(l16 - l32).max() < 0.05 * scale
  assert np.mean(l16.argmax(-1) == l32.argmax(-1)) > 0.8


def test_validate_rejects_d_model_not_divisible_by_heads():
  with pytest.raises(ConfigError, match=r"model\.d_model"):
    validate_model_config(_cfg(d_model=30, n_heads=4))
  with pytest.raises(ConfigError, match=r"model\.d_model"):
    DenseLM(_cfg(d_model=30, n_heads=4), rngs=nnx.Rngs(params=0))


def test_validate_rejects_heads_not_multiple_of_kv_heads():
  with pytest.raises(ConfigError, match=r"model\.n_kv_heads"):
    validate_model_config(_cfg(n_heads=4, n_kv_heads=3))


def test_validate_accepts_explicit_head_dim_whatever_d_model():
  validate_model_config(_cfg(d_model=30, n_heads=4, head_dim=8))


def test_build_model_rejects_unknown_name():
  cfg = _cfg()
  cfg.name = "nope"
  with pytest.raises(ConfigError, match=r"model\.name"):
    build_model(cfg, seed=0)


def test_window_one_layer_ignores_tokens_outside_the_window():
  """With one layer, position t sees exactly the tokens t-window+1 .. t: changing older tokens changes
  nothing at t, changing one inside the window does."""
  window, length, t = 4, 16, 12
  model = _model(n_layers=1, window=window)
  tokens = _tokens((2, length), seed=5)
  base = _logits(model, tokens)
  old = tokens.copy()
  old[:, :t - window + 1] = (tokens[:, :t - window + 1] + 1) % VOCAB  # positions 0..t-window
  out = _logits(model, old)
  np.testing.assert_allclose(out[:, t], base[:, t], rtol=1e-5, atol=1e-5)
  inside = tokens.copy()
  inside[:, t - window + 1] = (tokens[:, t - window + 1] + 1) % VOCAB
  assert not np.allclose(_logits(model, inside)[:, t], base[:, t], atol=1e-4)


def test_without_window_old_tokens_matter():
  """The control for the window test: with full causal attention the same change is seen at t."""
  model = _model(n_layers=1, window=0)
  tokens = _tokens((2, 16), seed=5)
  old = tokens.copy()
  old[:, :9] = (tokens[:, :9] + 1) % VOCAB
  assert not np.allclose(_logits(model, old)[:, 12], _logits(model, tokens)[:, 12],
                         atol=1e-4)
