"""The BLT (blt.model): shapes, end-to-end causality under static, space and entropy patching (both decoder
groupings), which global outputs each byte reads, and that both the local path and the global (earlier
patches) path reach the logits."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt.entropy import next_byte_entropies
from blt.model import BLT, blt_model
from blt.patcher import patch
from common.config import load
from common.configs.base import dense_model
from common.models.dense_lm import DenseLM
from tests.mesh_invariance import assert_train_step_mesh_invariant

LENGTH, MAX_PATCHES = 24, 24


SMALL = dict(d_local=32, n_heads_local=2, local_window=6, n_heads_cross=2, d_global=48, n_heads_global=2,
             n_layers_global=2, hash_table_size=101)


@pytest.fixture(scope="module")
def model():
  return BLT(blt_model(**SMALL), rngs=nnx.Rngs(params=0))


@pytest.fixture(scope="module")
def lagged_model():
  return BLT(blt_model(**SMALL, decoder_grouping="lagged"), rngs=nnx.Rngs(params=0))


@pytest.fixture(scope="module")
def entropy_model():
  cfg = dense_model(vocab_size=260, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, window=8)
  return DenseLM(cfg, rngs=nnx.Rngs(params=1))


def _patches(x, method, entropy_model, threshold=5.05):
  if method == "static":
    return patch(x, method="static", patch_size=4, max_patches=MAX_PATCHES)
  if method == "space":
    return patch(x, method="space", max_patches=MAX_PATCHES, max_patch_length=6)
  h = next_byte_entropies(entropy_model, x)
  return patch(x, method="entropy", entropies=h, threshold=threshold, max_patches=MAX_PATCHES, max_patch_length=6)


def _forward(model):
  return nnx.jit(lambda mdl, x, p: mdl(x, p.patch_ids, MAX_PATCHES, next_patch_ids=p.next_patch_ids))


def _text_like(rng, shape):
  """Bytes with spaces, so space patching makes several patches."""
  letters = np.frombuffer(b"abcdefghij  ,.\n", np.uint8)
  return jnp.asarray(rng.choice(letters, shape), jnp.int32)


def test_logits_shape_and_finite(model):
  x = _text_like(np.random.default_rng(0), (2, LENGTH))
  logits = _forward(model)(model, x, _patches(x, "static", None))
  assert logits.shape == (2, LENGTH, 260) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("grouping, method", [("official", "static"), ("official", "space"),
                                              ("official", "entropy"), ("lagged", "entropy")])
def test_changing_later_bytes_never_changes_earlier_logits(model, lagged_model, entropy_model, grouping, method):
  model = model if grouping == "official" else lagged_model
  rng = np.random.default_rng(1)
  fwd = _forward(model)
  x = _text_like(rng, (2, LENGTH))
  base = np.asarray(fwd(model, x, _patches(x, method, entropy_model)))
  if method == "entropy":  # untrained model: H ~ 5 nats; the fixed threshold must make several patches for the test to mean anything
    n = patch(x, method="entropy", entropies=next_byte_entropies(entropy_model, x), threshold=5.05,
              max_patches=MAX_PATCHES).num_patches
    assert (n > 3).all() and (n < LENGTH).all(), n
  for t in (0, 3, 4, 9, 17, LENGTH - 2):
    y = x.at[:, t + 1:].set(_text_like(rng, (2, LENGTH - t - 1)))
    out = np.asarray(fwd(model, y, _patches(y, method, entropy_model)))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5, err_msg=f"t={t}")


def test_earlier_patches_reach_the_logits_through_the_global_model(model):
  # Static patches of 4 and a local window of 6: byte 0 is out of the decoder's window at byte 20, so only
  # the global path (patches 0..4 before patch 5) can carry it there.
  x = _text_like(np.random.default_rng(2), (1, LENGTH))
  ids = _patches(x, "static", None)
  fwd = _forward(model)
  base = np.asarray(fwd(model, x, ids))
  changed = np.asarray(fwd(model, x.at[0, 0].set((x[0, 0] + 1) % 256), ids))
  assert np.abs(changed[0, 20] - base[0, 20]).max() > 1e-6
  assert np.abs(changed[0, 0] - base[0, 0]).max() > 1e-6  # and the local path at byte 0 itself


@pytest.mark.parametrize("grouping, first", [("official", 11), ("lagged", 12)])
def test_the_byte_that_ends_a_patch_reads_it_only_under_the_official_grouping(grouping, first):
  """Static patches of 4: patch 2 holds bytes 8..11. A change of its global output reaches the decoder from
  byte 11 on (the byte whose next byte opens patch 3) under the official grouping, from byte 12 on (patch
  3's first byte) under the lagged one."""
  m = BLT(blt_model(**SMALL, decoder_grouping=grouping), rngs=nnx.Rngs(params=0))
  x = _text_like(np.random.default_rng(4), (1, LENGTH))
  p = _patches(x, "static", None)
  pos, seg = jnp.arange(LENGTH)[None], jnp.ones_like(x)
  h, patches = m.local_encoder(x, p.patch_ids, MAX_PATCHES, pos, seg)
  g = m.global_transformer(patches)
  readable = p.next_patch_ids if grouping == "official" else p.patch_ids
  base = m.local_decoder(h, g, readable, pos, seg)
  bumped = m.local_decoder(h, g.at[:, 2].add(1.0), readable, pos, seg)
  changed = np.flatnonzero(np.abs(np.asarray(bumped - base)).max(-1)[0] > 1e-6)
  assert changed.tolist() == list(range(first, LENGTH))


def test_the_official_grouping_needs_the_next_patch_ids():
  m = BLT(blt_model(**SMALL), rngs=nnx.Rngs(params=0))
  x = _text_like(np.random.default_rng(5), (1, 8))
  with pytest.raises(ValueError, match="next_patch_ids"):
    m(x, _patches(x, "static", None).patch_ids, MAX_PATCHES)


def test_default_config_follows_the_paper_hash_range():
  cfg = blt_model()
  assert (cfg.hash_n_min, cfg.hash_n_max) == (3, 8) and cfg.vocab_size == 260


@nnx.jit
def _packed_forward(model, x, p, positions, segment_ids):
  return model(x, p.patch_ids, MAX_PATCHES, positions, segment_ids, p.next_patch_ids)


@pytest.mark.parametrize("grouping, method", [("official", "static"), ("official", "space"), ("lagged", "space")])
def test_packed_documents_get_the_logits_they_get_alone(model, lagged_model, grouping, method):
  """Row 0 packs document a (12 bytes) and document b (12 bytes); rows 1 and 2 hold each alone, followed by
  padding (segment 0). The patcher opens a patch at every document start; the model must keep b's patches
  away from a's in the global transformer and the decoder, and restart b's patch positions."""
  model = model if grouping == "official" else lagged_model
  rng = np.random.default_rng(3)
  a, b = _text_like(rng, (12,)), _text_like(rng, (12,))
  pad = jnp.full((12,), 258, jnp.int32)
  x = jnp.stack([jnp.concatenate([a, b]), jnp.concatenate([a, pad]), jnp.concatenate([b, pad])])
  first, second = jnp.arange(LENGTH) < 12, jnp.arange(LENGTH) >= 12
  segs = jnp.stack([jnp.where(first, 1, 2), jnp.where(first, 1, 0), jnp.where(first, 1, 0)])
  positions = jnp.broadcast_to(jnp.where(first, jnp.arange(LENGTH), jnp.arange(LENGTH) - 12), x.shape)
  kwargs = dict(patch_size=4) if method == "static" else dict(max_patch_length=6)
  p = patch(x, method=method, max_patches=MAX_PATCHES, segment_ids=segs, positions=positions, **kwargs)
  assert int(p.patch_ids[0, 12]) > int(p.patch_ids[0, 11])  # b opens a patch of its own
  logits = np.asarray(_packed_forward(model, x, p, positions, segs))
  np.testing.assert_allclose(logits[0, :12], logits[1, :12], atol=1e-5)
  np.testing.assert_allclose(logits[0, 12:], logits[2, :12], atol=1e-5)


def test_patch_documents_of_a_packed_row():
  from blt.model import patch_documents
  # bytes: doc 1 in patches 0, 1; doc 2 in patches 2, 3, 4; padding (segment 0) in patch 5; slots 6, 7 empty
  patch_ids = jnp.array([[0, 0, 1, 2, 2, 3, 4, 4, 5, 5]])
  segs = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2, 0, 0]])
  patch_segs, patch_pos = patch_documents(patch_ids, segs, 8)
  np.testing.assert_array_equal(patch_segs, [[1, 1, 2, 2, 2, 0, 0, 0]])
  np.testing.assert_array_equal(patch_pos, [[0, 1, 0, 1, 2, 0, 1, 2]])


class _PackedRows:
  """LMData's batch format (seqio byte ids: byte + 3, BOS/PAD 0, EOS 1): each row two documents, then
  padding. Stands in for the embedded corpus so the mesh test needs no data pipeline."""

  def __init__(self, data_cfg, *, batch_size, seed):
    self.batch_size, self.seq_len = batch_size, int(data_cfg.seq_len)

  def train_batch(self, position):
    rng = np.random.default_rng(position)
    n, cut, end = self.seq_len, self.seq_len // 3, self.seq_len - 5
    text = rng.choice(np.frombuffer(b"abcdefghij  ,.\n", np.uint8), (self.batch_size, n + 1)).astype(np.int32) + 3
    index = np.arange(n + 1)
    segs = np.where(index < cut, 1, np.where(index < end, 2, 0))
    positions = np.where(index < cut, index, np.where(index < end, index - cut, 0))
    tokens = np.where(positions == 0, 0, text)
    tokens = np.where(np.isin(index + 1, (cut, end)), 1, tokens)  # EOS ends each document
    tokens = np.where(segs == 0, 0, tokens)
    b = self.batch_size
    return {"inputs": tokens[:, :n], "targets": tokens[:, 1:] * (segs[None, :n] > 0),
            "segment_ids": np.broadcast_to(segs[:n], (b, n)).astype(np.int32),
            "positions": np.broadcast_to(positions[:n], (b, n)).astype(np.int32),
            "loss_mask": np.broadcast_to(segs[:n] > 0, (b, n)).astype(np.float32)}


def test_one_training_step_is_the_same_on_every_mesh(monkeypatch):
  """blt.train's task, one step of the shared train step on 1 device and on data 2 x fsdp 2 x tensor 2:
  the mesh changes placement only, never the loss or the updated parameters (beyond float rounding)."""
  from blt import data as blt_data
  from blt import train as blt_train
  from blt.configs.tiny import get_config
  cfg = get_config("patcher=space")
  cfg.model.update(d_local=32, n_heads_local=2, n_heads_cross=2, local_window=8, d_global=64, n_heads_global=2,
                   hash_n_max=4, hash_table_size=64, n_layers_decoder=1, n_layers_global=1)
  cfg.model.patching.max_patches = 32  # one patch per byte at most: no pass over the data for a bound
  cfg.data.seq_len = 32
  cfg.train.update(batch_size=8, warmup_steps=1)
  monkeypatch.setattr(blt_data, "LMData", _PackedRows)
  task = blt_train.make_task(blt_train.resolve(cfg))
  batch = task.data.train_batch(0)
  assert_train_step_mesh_invariant(task, cfg.train, batch)


def test_bfloat16_compute_keeps_f32_params_and_close_logits():
  """`--config.model.dtype=bfloat16` as in the dense LM: activations and matmuls in bf16, the same f32
  parameters (same seed), f32 logits close to the f32 model's."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  m = load(os.path.join(root, "blt", "configs", "tiny.py"), [("model.dtype", "bfloat16")]).model
  m.update(d_local=32, n_heads_local=2, n_heads_cross=2, d_global=48, n_heads_global=2, hash_table_size=101)
  m16 = BLT(m, rngs=nnx.Rngs(params=0))
  m32 = BLT(blt_model(**dict(m.to_dict(), dtype="float32")), rngs=nnx.Rngs(params=0))
  p16, p32 = jax.tree.leaves(nnx.state(m16, nnx.Param)), jax.tree.leaves(nnx.state(m32, nnx.Param))
  assert all(x.dtype == jnp.float32 for x in p16)
  for x, y in zip(p16, p32):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  x = jnp.asarray(np.frombuffer(b"def f(x):\n  return x + 1\n", np.uint8)[None].astype(np.int32))
  p = patch(x, method="static", patch_size=4, max_patches=8)
  l16, l32 = m16(x, p.patch_ids, 8, next_patch_ids=p.next_patch_ids), m32(x, p.patch_ids, 8, next_patch_ids=p.next_patch_ids)
  assert l16.dtype == jnp.float32
  l16, l32 = np.asarray(l16), np.asarray(l32)
  assert np.abs(l16 - l32).max() < 0.05 * np.abs(l32).max()
  assert np.mean(l16.argmax(-1) == l32.argmax(-1)) > 0.8
