"""The planner: Llama 3 parameter counts, sharded memory, exit status 2 when a plan does not fit."""
import json
import math
import os
import subprocess
import sys

import pytest

from common import flops, plan
from common.config import ConfigError, load
from common.configs.base import dense_model
from common.sharding import make_abstract_mesh, spec_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "common", "configs")


def _mesh(**sizes):
  return make_abstract_mesh(tuple(sizes.values()), tuple(sizes), math.prod(sizes.values()))


@pytest.mark.parametrize("name,published", [("llama3_1b", 1.24e9), ("llama3_8b", 8.03e9),
                                            ("llama3_70b", 70.6e9)])
def test_llama3_parameter_counts(name, published):
  cfg = load(os.path.join(CONFIGS, f"{name}.py"))
  counts = plan.param_totals(cfg.model, _mesh(fsdp=1))
  assert abs(counts["total"] - published) / published < 0.005
  assert counts["total"] == flops.param_count(cfg.model)["total"]
  assert counts["total"] - counts["embedding"] == flops.param_count(cfg.model)["non_embedding"]


def test_depth_extrapolation_equals_full_build():
  m = dense_model(vocab_size=256, d_model=64, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=128)
  mesh = _mesh(fsdp=2, tensor=2)
  shards = plan.param_shards(m, mesh)
  assert plan.param_totals(m, mesh) == dict(
      total=sum(math.prod(s) for s, _, _ in shards),
      embedding=sum(math.prod(s) for s, _, vocab in shards if vocab),
      per_device=sum(local for _, local, _ in shards))


def test_fsdp8_divides_parameter_memory_by_8():
  cfg = load(os.path.join(CONFIGS, "llama3_8b.py"))
  p = plan.make_plan(cfg, {"fsdp": 8})
  assert p.param_gib * plan.GIB == p.params_total * 4 / 8  # every parameter has a d_model dim: 4096 % 8 == 0
  assert p.optimizer_gib == 2 * p.param_gib and p.grad_gib == p.param_gib
  assert p.flops_per_step == flops.training_flops_per_token(cfg.model, 8192) * 256 * 8192


def test_tensor_parallel_halves_sharded_matrices():
  # n_kv_heads 1 does not divide over tensor:2, so k/v stay whole there (spec_for's rule).
  m = dense_model(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=1, d_ff=128,
                  tie_embeddings=False)
  mesh = _mesh(tensor=2)
  local = {}
  for shape, n_local, _ in plan.param_shards(m, mesh):
    local.setdefault(shape, set()).add(n_local)
  assert local[(64, 4, 16)] == {64 * 4 * 16 // 2}   # q: heads over tensor
  assert local[(64, 1, 16)] == {64 * 16}            # k, v: one kv head, replicated
  assert local[(64, 128)] == {64 * 128 // 2}        # gate, up: mlp over tensor
  assert local[(128, 64)] == {128 * 64 // 2}        # down
  assert local[(64,)] == {64}                       # norm scales: replicated
  assert local[(256, 64)] == {256 * 64 // 2}        # embedding: vocab over tensor
  assert spec_for(("embed", "heads", "head_dim"), (64, 4, 16), mesh)[1] == "tensor"
  assert spec_for(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh)[1] is None


def test_activation_estimate():
  m = dense_model(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128)
  kw = dict(batch=2, seq_len=32, tensor=1)
  plain = plan.dense_lm_activation_bytes(m, remat=False, flash=False, **kw)
  remat = plan.dense_lm_activation_bytes(m, remat=True, flash=False, **kw)
  flash = plan.dense_lm_activation_bytes(m, remat=False, flash=True, **kw)
  b, seq, a, hd = 2, 32, 4, 16
  layer = (b * seq * a * (4 * 64 + (4 + 2 * 2) * hd + 4 * hd + 3 * 128)  # stream, q k v, attn out, SwiGLU
           + b * 4 * seq * seq * (4 + a) + b * seq * seq)                 # scores f32 + cast, mask
  assert plain["layers"] == 4 * layer
  assert remat["layers"] == 4 * b * seq * 64 * a + layer < plain["layers"]
  assert flash["layers"] < plain["layers"]
  assert plain["logits"] == 2 * b * seq * 256 * 4


def test_plan_errors():
  cfg = load(os.path.join(CONFIGS, "dense_bench.py"))
  with pytest.raises(ConfigError, match="accelerator"):
    plan.make_plan(cfg, {"data": 8}, accelerator="abacus")
  with pytest.raises(ConfigError, match="unknown mesh axis 'pipeline'"):
    plan.parse_mesh("fsdp:8,pipeline:2")
  with pytest.raises(ConfigError, match="train.batch_size"):
    plan.make_plan(cfg, {"data": 16})
  p = plan.make_plan(cfg, {"data": 8}, accelerator="v5e")
  assert p.vocab_size == 384 and "byte vocabulary" in p.notes[0] and p.fits
  assert cfg.model.vocab_size == 0  # the caller's config is left as it was


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "common.plan", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_does_not_fit_exits_2():
  r = _run(f"--config={CONFIGS}/llama3_70b.py", "--mesh=fsdp:8", "--accelerator=h100")
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "memory" in lines[0] and "h100" in lines[0]


def test_cli_fitting_plan_prints_table():
  r = _run(f"--config={CONFIGS}/dense_bench.py", "--mesh=data:8", "--accelerator=a100", "--mfu=0.5")
  assert r.returncode == 0, r.stderr
  for row in ("parameters", "optimizer", "gradients", "activations", "FLOPs / step", "step time", "GiB"):
    assert row in r.stdout
  r = _run(f"--config={CONFIGS}/llama3_8b.py:train.batch_size=64", "--mesh=fsdp:32,tensor:8", "--json")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["fits"] and out["n_devices"] == 256 and out["local_batch"] == 2


@pytest.mark.parametrize("flag,word", [("--mesh=fsdp:8,pipe:2", "pipe"), ("--accelerator=tpu9", "tpu9")])
def test_cli_bad_input_exits_2(flag, word):
  r = _run(f"--config={CONFIGS}/dense_bench.py", "--mesh=data:8", flag)
  assert r.returncode == 2 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1
