"""KV-cached decoding (common.nn.kv_cache, Attention.decode, Block.decode) against the full forward pass of
the dense LM: prefill then one token at a time, full and sliding-window attention (the ring buffer wraps),
packed documents, and rows that advance independently."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.configs.base import dense_model
from common.models.dense_lm import DenseLM
from common.nn.kv_cache import cache_slots, decode_blocks, init_caches

VOCAB, LENGTH = 64, 14


def _model(window):
  cfg = dense_model(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, window=window)
  return DenseLM(cfg, rngs=nnx.Rngs(params=window))


@nnx.jit
def _decode(model, tokens, positions, segment_ids, caches, advance=None):
  """The dense LM's logits for new tokens [batch, new] given the caches: the cached twin of model(...)."""
  x, caches = decode_blocks(model.blocks, model.embed(tokens), positions, segment_ids, caches, advance)
  return model.logits(model.final_norm(x)), caches


def _tokens(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


@pytest.mark.parametrize("window,prefill", [(0, 5), (4, 3), (4, 6)])
def test_prefill_then_steps_equals_the_full_forward(window, prefill):
  model = _model(window)
  tokens = _tokens(0, (2, LENGTH))
  positions = jnp.broadcast_to(jnp.arange(LENGTH), tokens.shape)
  segs = jnp.ones_like(tokens)
  full = np.asarray(model(tokens))
  caches = init_caches(model.blocks, 2, LENGTH)
  assert caches[0].slots == cache_slots(LENGTH, window)
  logits, caches = _decode(model, tokens[:, :prefill], positions[:, :prefill], segs[:, :prefill], caches)
  out = [np.asarray(logits)]
  for t in range(prefill, LENGTH):
    logits, caches = _decode(model, tokens[:, t:t + 1], positions[:, t:t + 1], segs[:, t:t + 1], caches)
    out.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(out, axis=1), full, atol=1e-5, rtol=1e-5)
  assert (np.asarray(caches[0].length) == LENGTH).all()


def test_packed_documents_decode_as_in_the_full_forward():
  model = _model(4)
  tokens = _tokens(1, (1, LENGTH))
  cut = 6
  segs = jnp.where(jnp.arange(LENGTH) < cut, 1, 2)[None]
  positions = jnp.where(jnp.arange(LENGTH) < cut, jnp.arange(LENGTH), jnp.arange(LENGTH) - cut)[None]
  full = np.asarray(model(tokens, positions, segs))
  caches = init_caches(model.blocks, 1, LENGTH)
  out = []
  for t in range(LENGTH):
    logits, caches = _decode(model, tokens[:, t:t + 1], positions[:, t:t + 1], segs[:, t:t + 1], caches)
    out.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(out, axis=1), full, atol=1e-5, rtol=1e-5)


def test_rows_that_do_not_advance_keep_their_cache():
  """Row 0 takes every step, row 1 only every other one: each row's outputs at the steps it takes equal the
  full forward of its own tokens, as if the skipped steps never happened."""
  model = _model(3)
  tokens = _tokens(2, (2, LENGTH))
  full = np.asarray(model(tokens))
  caches = init_caches(model.blocks, 2, LENGTH)
  taken = [0, 0]
  for step in range(2 * LENGTH):
    advance = np.array([step < LENGTH, step % 2 == 0 and taken[1] < LENGTH])
    idx = [min(taken[0], LENGTH - 1), min(taken[1], LENGTH - 1)]
    tok = jnp.asarray([[tokens[0, idx[0]]], [tokens[1, idx[1]]]])
    pos = jnp.asarray([[idx[0]], [idx[1]]])
    logits, caches = _decode(model, tok, pos, jnp.ones_like(tok), caches, jnp.asarray(advance))
    for row in (0, 1):
      if advance[row]:
        np.testing.assert_allclose(np.asarray(logits)[row, 0], full[row, idx[row]], atol=1e-5, rtol=1e-5,
                                   err_msg=f"row {row} token {idx[row]}")
        taken[row] += 1
  assert taken == [LENGTH, LENGTH]
  np.testing.assert_array_equal(np.asarray(caches[1].length), [LENGTH, LENGTH])


def test_decoding_past_the_end_of_a_full_cache_is_an_error():
  """Outside jit at once, under jit from the host. A ring buffer (window <= slots) wraps as designed (the
  tests above), but a windowed cache shorter than its window has an end too."""
  from common.nn.kv_cache import CacheOverflowError  # pylint: disable=import-outside-toplevel
  for window, length in ((0, LENGTH), (4, 3)):
    model = _model(window)
    tokens = _tokens(3, (2, length + 1))
    caches = init_caches(model.blocks, 2, length)
    segs = jnp.ones_like(tokens[:, :1])
    _, full = model.decode(tokens[:, :length], jnp.broadcast_to(jnp.arange(length), (2, length)),
                           jnp.ones_like(tokens[:, :length]), caches)
    with pytest.raises(CacheOverflowError, match=f"rows would hold {length + 1} tokens in {length} slots"):
      model.decode(tokens[:, length:], jnp.full((2, 1), length), segs, full)
    with pytest.raises(Exception, match="past the end of the KV cache"):
      _decode(model, tokens[:, length:], jnp.full((2, 1), length), segs, full)[0].block_until_ready()
