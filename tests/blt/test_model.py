"""The BLT (blt.model): shapes, end-to-end causality under static, space and entropy patching, and that
both the local path and the global (earlier patches) path reach the logits."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt.entropy import next_byte_entropies
from blt.model import BLT, blt_model
from blt.patcher import patch
from common.configs.base import dense_model
from common.models.dense_lm import DenseLM

LENGTH, MAX_PATCHES = 24, 24


@pytest.fixture(scope="module")
def model():
  cfg = blt_model(d_local=32, n_heads_local=2, local_window=6, n_heads_cross=2, d_global=48, n_heads_global=2,
                  n_layers_global=2, hash_table_size=101)
  return BLT(cfg, rngs=nnx.Rngs(params=0))


@pytest.fixture(scope="module")
def entropy_model():
  cfg = dense_model(vocab_size=260, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, window=8)
  return DenseLM(cfg, rngs=nnx.Rngs(params=1))


def _patch_ids(x, method, entropy_model, threshold=5.05):
  if method == "static":
    return patch(x, method="static", patch_size=4, max_patches=MAX_PATCHES).patch_ids
  if method == "space":
    return patch(x, method="space", max_patches=MAX_PATCHES, max_patch_length=6).patch_ids
  h = next_byte_entropies(entropy_model, x)
  return patch(x, method="entropy", entropies=h, threshold=threshold, max_patches=MAX_PATCHES,
               max_patch_length=6).patch_ids


def _forward(model):
  return nnx.jit(lambda mdl, x, ids: mdl(x, ids, MAX_PATCHES))


def _text_like(rng, shape):
  """Bytes with spaces, so space patching makes several patches."""
  letters = np.frombuffer(b"abcdefghij  ,.\n", np.uint8)
  return jnp.asarray(rng.choice(letters, shape), jnp.int32)


def test_logits_shape_and_finite(model):
  x = _text_like(np.random.default_rng(0), (2, LENGTH))
  logits = _forward(model)(model, x, _patch_ids(x, "static", None))
  assert logits.shape == (2, LENGTH, 260) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("method", ["static", "space", "entropy"])
def test_changing_later_bytes_never_changes_earlier_logits(model, entropy_model, method):
  rng = np.random.default_rng(1)
  fwd = _forward(model)
  x = _text_like(rng, (2, LENGTH))
  base = np.asarray(fwd(model, x, _patch_ids(x, method, entropy_model)))
  if method == "entropy":  # untrained model: H ~ 5 nats; the fixed threshold must make several patches for the test to mean anything
    n = patch(x, method="entropy", entropies=next_byte_entropies(entropy_model, x), threshold=5.05,
              max_patches=MAX_PATCHES).num_patches
    assert (n > 3).all() and (n < LENGTH).all(), n
  for t in (0, 3, 4, 9, 17, LENGTH - 2):
    y = x.at[:, t + 1:].set(_text_like(rng, (2, LENGTH - t - 1)))
    out = np.asarray(fwd(model, y, _patch_ids(y, method, entropy_model)))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5, err_msg=f"t={t}")


def test_earlier_patches_reach_the_logits_through_the_global_model(model):
  # Static patches of 4 and a local window of 6: byte 0 is out of the decoder's window at byte 20, so only
  # the global path (patches 0..4 before patch 5) can carry it there.
  x = _text_like(np.random.default_rng(2), (1, LENGTH))
  ids = _patch_ids(x, "static", None)
  fwd = _forward(model)
  base = np.asarray(fwd(model, x, ids))
  changed = np.asarray(fwd(model, x.at[0, 0].set((x[0, 0] + 1) % 256), ids))
  assert np.abs(changed[0, 20] - base[0, 20]).max() > 1e-6
  assert np.abs(changed[0, 0] - base[0, 0]).max() > 1e-6  # and the local path at byte 0 itself


def test_default_config_follows_the_paper_hash_range():
  cfg = blt_model()
  assert (cfg.hash_n_min, cfg.hash_n_max) == (3, 8) and cfg.vocab_size == 260
