"""Analytic FLOP and parameter counts against XLA and the built model; peak table; CPU calibration."""
import json
import os

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from common import flops
from common.config import ConfigError
from common.configs.base import dense_model
from common.models import build_model


def _toy(**kw):
  """1 layer, d 8, 2 heads of 4 (GQA: 1 kv head), d_ff 16, vocab 32."""
  return dense_model(**{**dict(vocab_size=32, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16), **kw})


def test_hand_computed_one_layer():
  c = flops.dense_lm_flops(_toy(), 4, causal=False)
  assert c.q == 2 * 8 * 2 * 4 == 128
  assert c.k == c.v == 2 * 8 * 1 * 4 == 64
  assert c.o == 2 * (2 * 4) * 8 == 128
  assert c.attention == 2 * 2 * 2 * 4 * 4 == 128       # scores + values, 4 keys per query
  assert c.mlp == 3 * 2 * 8 * 16 == 768
  assert c.logits == 2 * 8 * 32 == 512
  assert c.embedding == 0
  assert c.forward == 128 + 64 + 64 + 128 + 128 + 768 + 512 == 1792
  assert c.training == 3 * 1792 == 5376
  causal = flops.dense_lm_flops(_toy(), 4)
  assert causal.attention == 2 * 2 * 2 * 4 * 2.5 == 80  # (4 + 1) / 2 keys on average
  assert causal.training == 3 * (1792 - 128 + 80)
  windowed = flops.dense_lm_flops(_toy(window=2), 4)
  assert windowed.attention == 2 * 2 * 2 * 4 * (1 + 2 + 2 + 2) / 4 == 56  # min(i, 2) keys for i = 1..4


def test_hand_computed_param_count():
  # attention 8*8 + 2*8*4 + 8*8 = 192, SwiGLU 3*8*16 = 384, two norms 16, final norm 8; table 32*8
  assert flops.param_count(_toy()) == dict(total=600 + 256, non_embedding=600)
  assert flops.param_count(_toy(tie_embeddings=False)) == dict(total=600 + 2 * 256, non_embedding=600)


@pytest.mark.parametrize("cfg", [
    _toy(), _toy(tie_embeddings=False), _toy(qk_norm=True, head_dim=8),
    dense_model(vocab_size=384, d_model=256, n_layers=3, n_heads=8, n_kv_heads=2, d_ff=640),
])
def test_param_count_matches_built_model(cfg):
  model = build_model(cfg, seed=0)
  real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert flops.param_count(cfg)["total"] == real


def _xla_training_flops(cfg, batch, seq_len):
  model = build_model(cfg, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p, tokens):
    logits = nnx.merge(graphdef, p)(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  tokens = jnp.zeros((batch, seq_len), jnp.int32)
  cost = jax.jit(jax.value_and_grad(loss_fn)).lower(params, tokens).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("tied", [False, True])
def test_non_causal_count_matches_xla(tied):
  # d 256 with d_ff 1024: matmuls dominate the element-wise work XLA also counts (norms, softmax, RoPE).
  cfg = dense_model(vocab_size=384, d_model=256, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=1024,
                    tie_embeddings=tied)
  batch, seq_len = 4, 128
  analytic = flops.dense_lm_flops(cfg, seq_len, causal=False).training * batch * seq_len
  xla = _xla_training_flops(cfg, batch, seq_len)
  assert abs(xla - analytic) / analytic < 0.05, (xla, analytic)


def test_causal_and_window_reduce_attention():
  cfg = dense_model(vocab_size=384, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=768)
  full = flops.dense_lm_flops(cfg, 1024, causal=False)
  causal = flops.dense_lm_flops(cfg, 1024)
  windowed = flops.dense_lm_flops(dense_model(**{**cfg.to_dict(), "window": 128}), 1024)
  assert windowed.attention < causal.attention < full.attention
  assert windowed.mlp == causal.mlp == full.mlp
  assert causal.training < full.training
  assert causal.attention == full.attention * (1024 + 1) / 2 / 1024
  # a window at least as long as the sequence changes nothing
  assert flops.dense_lm_flops(dense_model(**{**cfg.to_dict(), "window": 4096}), 1024) == causal


def test_dispatch_by_model_name():
  cfg = _toy()
  assert flops.training_flops_per_token(cfg, 4) == flops.dense_lm_flops(cfg, 4).training
  with pytest.raises(ConfigError, match="model.name"):
    flops.training_flops_per_token(_toy(name="nope"), 4)
  flops.register_flops("nope", lambda m, seq_len, causal=True: flops.FlopCount(mlp=7.0))
  try:
    assert flops.training_flops_per_token(_toy(name="nope"), 4) == 21.0
  finally:
    del flops.FLOPS_BY_MODEL["nope"]
  with pytest.raises(ConfigError, match="vocab_size"):
    flops.dense_lm_flops(_toy(vocab_size=0), 4)


@pytest.mark.parametrize("kind,name", [
    ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"),
    ("TPU v6 lite", "v6e"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H100 PCIe", "h100_pcie"), ("NVIDIA H200", "h200"), ("h100", "h100"), ("v5e", "v5e"),
])
def test_peak_table_lookup(kind, name):
  assert flops.accelerator_for(kind).name == name


def test_peak_values():
  assert flops.accelerator_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert flops.accelerator_peak("h100", "float32") == 494.7e12       # TF32, JAX's default f32 precision
  assert flops.accelerator_peak("a100", "float32_highest") == 19.5e12
  assert flops.accelerator_peak("TPU v5 lite", "float32") == 197e12  # one bf16 pass on TPU
  assert flops.accelerator_for("Intel Xeon") is None
  assert flops.ACCELERATORS["h200"].hbm_gib == 141


def test_cpu_peak_from_env(monkeypatch):
  monkeypatch.setenv(flops.CPU_PEAK_ENV, "8e10")
  n_cpu = len(jax.devices("cpu"))
  assert flops.machine_peak_flops() == 8e10
  assert flops.peak_flops_per_device(jax.devices("cpu")[0]) == pytest.approx(8e10 / n_cpu)
  assert flops.mfu(2e10, n_cpu, 8e10 / n_cpu) == pytest.approx(0.25)
  monkeypatch.setenv(flops.CPU_PEAK_ENV, "fast")
  with pytest.raises(ValueError, match=flops.CPU_PEAK_ENV):
    flops.machine_peak_flops()


def test_cpu_calibration_writes_and_reads_cache(monkeypatch, tmp_path):
  monkeypatch.delenv(flops.CPU_PEAK_ENV, raising=False)
  monkeypatch.setenv(flops.CACHE_DIR_ENV, str(tmp_path))
  peak = flops.machine_peak_flops(n=512, repeats=3)
  assert peak > 0
  with open(tmp_path / "cpu_peak.json") as f:
    table = json.load(f)
  key, = table
  assert str(os.cpu_count()) in key and jax.__version__ in key and table[key] == peak

  def no_measuring(*args, **kwargs):
    raise AssertionError("the cached value should have been used")

  monkeypatch.setattr(flops, "measure_cpu_matmul_flops", no_measuring)
  assert flops.machine_peak_flops() == peak
