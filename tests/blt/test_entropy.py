"""Next-byte entropies (blt.entropy) against numpy, over the real vocabulary; the scorer's vocabulary map and
kernel path; loading errors. Loading a trained entropy model is tested end to end in test_train.py."""
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt.entropy import (ENTROPY_VOCAB_SIZE, EntropyScorer, entropy_from_logits, load_entropy_model,
                         next_byte_entropies, to_bits)
from common.config import ConfigError
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


def test_real_vocabulary_entropy_ignores_the_padded_columns_hand_computed():
  # 259 real ids: id 5 at logit ln 3, the other 258 at 0, so Z = 261 and H = ln 261 - 3 ln 3 / 261; the 125
  # padding columns of a 384-wide output layer carry large logits that would dominate if they counted.
  logits = jnp.zeros((1, 2, 384)).at[..., 5].set(math.log(3.0)).at[..., ENTROPY_VOCAB_SIZE:].set(20.0)
  expected = math.log(261.0) - 3.0 * math.log(3.0) / 261.0
  for impl in ("reference", "interpret"):
    h = entropy_from_logits(logits, vocab_size=ENTROPY_VOCAB_SIZE, impl=impl)
    np.testing.assert_allclose(h, [[expected, expected]], rtol=1e-6)
  assert abs(float(entropy_from_logits(logits)[0, 0]) - math.log(125.0)) < 1e-3  # all 384 columns: the padding's


def test_next_byte_entropies_of_a_byte_lm_over_its_real_vocabulary():
  cfg = dense_model(vocab_size=384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, window=8)
  model = DenseLM(cfg, rngs=nnx.Rngs(params=0))
  x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)), jnp.int32)
  h = next_byte_entropies(model, x)
  assert h.shape == (2, 12)
  np.testing.assert_allclose(h, _numpy_entropy(np.asarray(model(x))[..., :ENTROPY_VOCAB_SIZE]), rtol=1e-5)


def test_scorer_maps_blt_ids_to_the_models_byte_vocabulary():
  # The entropy model reads seqio byte ids (byte + 3, BOS/PAD 0, EOS 1); the scorer takes BLT ids.
  cfg = dense_model(vocab_size=384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, window=8)
  model = DenseLM(cfg, rngs=nnx.Rngs(params=0))
  blt_ids = jnp.asarray([[256, 104, 105, 32, 0, 255, 257, 258]], jnp.int32)
  seqio_ids = jnp.asarray([[0, 107, 108, 35, 3, 258, 1, 0]], jnp.int32)
  np.testing.assert_allclose(EntropyScorer(model)(blt_ids), next_byte_entropies(model, seqio_ids), rtol=1e-6)
  # through the Pallas kernel (interpreted here; compiled on GPU, where 'auto' picks it): the same entropies
  np.testing.assert_allclose(EntropyScorer(model, impl="interpret")(blt_ids), EntropyScorer(model)(blt_ids),
                             atol=2e-5)


@pytest.mark.parametrize("make", ["missing", "no_config", "no_checkpoints", "not_bytes"])
def test_load_errors_name_the_key_and_the_path(tmp_path, make):
  workdir = tmp_path / "entropy_model"
  if make != "missing":
    workdir.mkdir()
  if make in ("no_checkpoints", "not_bytes"):
    vocab = "byte" if make == "no_checkpoints" else "spm"
    (workdir / "config.json").write_text(json.dumps({"model": {"name": "dense_lm"}, "data": {"vocab": vocab}}))
  with pytest.raises(ConfigError, match="model.patching.entropy_model") as err:
    load_entropy_model(str(workdir))
  assert str(workdir) in str(err.value)


def test_train_entropy_cli_refuses_non_byte_data_with_status_2(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-m", "blt.train_entropy", "--config=blt/configs/entropy_tiny.py",
                         "--config.data.vocab=spm", f"--workdir={tmp_path}/run"], cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2
  assert "data.vocab" in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "run").exists()
