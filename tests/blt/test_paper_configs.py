"""blt/configs/paper.py: the Table 10 shapes (Pagnoni et al. 2024) against the published per-stack parameter counts
and, for 1B, the released checkpoint's configuration as the transformers library defines it; every size plans on
H100 and TPU meshes (common.plan)."""
import json
import math
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from common import plan
from common.config import load
from common.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = os.path.join(ROOT, "blt", "configs", "paper.py")


def _config(size):
  return load(PAPER + f":size={size}")


def _block_params(cfg) -> dict[str, int]:
  """Parameters of each stack's transformer layers (what Table 10 counts), from the abstract model."""
  model = nnx.eval_shape(lambda: build_model(cfg.model, seed=0))
  count = lambda module: sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
  return {"encoder": sum(count(layer) for layer in model.local_encoder.layers),
          "global": sum(count(layer) for layer in model.global_transformer.layers),
          "decoder": sum(count(layer) for layer in model.local_decoder.layers)}


@pytest.mark.parametrize("size,published", [
    ("400m", dict(encoder=7e6, global_=470e6, decoder=50e6)),
    ("8b", dict(encoder=20e6, global_=6.4e9, decoder=120e6))])
def test_stacks_match_table_10(size, published):
  counts = _block_params(_config(size))
  for part, value in published.items():
    # Table 10 rounds to 2 significant digits; our SwiGLU widths follow the official rounding rule.
    assert abs(counts[part.rstrip("_")] - value) / value < 0.06, (part, counts)


def test_1b_is_the_released_checkpoint_configuration():
  transformers = pytest.importorskip("transformers")
  ref = transformers.BltConfig()
  m = _config("1b").model
  enc, dec, glob = ref.encoder_config, ref.decoder_config, ref.global_config
  assert (m.n_layers_encoder, m.d_local, m.n_heads_local) == (enc.num_hidden_layers, enc.hidden_size,
                                                               enc.num_attention_heads)
  assert (m.n_layers_decoder, m.d_ff_local) == (dec.num_hidden_layers, dec.intermediate_size)
  assert (m.n_layers_global, m.d_global, m.n_heads_global, m.d_ff_global) == (
      glob.num_hidden_layers, glob.hidden_size, glob.num_attention_heads, glob.intermediate_size)
  assert (m.cross_attn_k, m.local_window, m.rope_theta) == (ref.cross_attn_k, ref.local_attention_window_len,
                                                            glob.rope_parameters["rope_theta"])
  assert list(range(m.hash_n_min, m.hash_n_max + 1)) == list(ref.encoder_hash_byte_group_size)
  assert (m.hash_table_size, m.hash_functions) == (ref.encoder_hash_byte_group_vocab,
                                                   ref.encoder_hash_byte_group_nb_functions)
  assert (m.encoder_cross == "every") == enc.cross_attn_all_layers
  assert (m.decoder_cross == "every") == dec.cross_attn_all_layers


@pytest.mark.parametrize("size,mesh,accelerator", [
    ("400m", {"fsdp": 64}, "h100"), ("1b", {"fsdp": 64}, "h100"), ("8b", {"fsdp": 64, "tensor": 4}, "h100"),
    ("1b", {"fsdp": 64}, "v5p")])
def test_every_size_plans_on_a_pod(size, mesh, accelerator):
  cfg = _config(size)
  p = plan.make_plan(cfg, mesh, accelerator=accelerator)
  assert p.fits and p.local_batch == 1
  # The activations grow with the patch slots the global model and the decoder cross-attention see.
  more_slots = cfg.copy_and_resolve_references()
  more_slots.model.patching.max_patches = 4096
  assert plan.make_plan(more_slots, mesh, accelerator=accelerator).activation_gib > p.activation_gib


def test_blt_activation_estimate_by_hand():
  cfg = _config("400m")
  m = cfg.model
  m.update(n_layers_encoder=1, n_layers_decoder=1, n_layers_global=1, local_window=0, d_local=8, d_global=16,
           n_heads_local=2, n_heads_global=2, n_heads_cross=2, d_ff_local=32, d_ff_global=64, vocab_size=260,
           dtype="float32")
  m.patching.max_patches = 3
  got = plan.blt_activation_bytes(m, batch=1, seq_len=6, tensor=1, remat=False, flash=False)
  a, L, n = 4, 6, 3
  local = L * a * (4 * 8 + 3 * 2 * 4 + 2 * 4 + 3 * 32) + 2 * L * L * (4 + a) + L * L
  glob = n * a * (4 * 16 + 3 * 2 * 8 + 2 * 8 + 3 * 64) + 2 * n * n * (4 + a) + n * n
  cross = 2 * L * n * (4 + a) + L * n + 3 * L * 8 * a
  assert got["layers"] == 2 * local + glob + cross + L * 8 * a
  assert got["logits"] == 2 * L * 260 * 4


def test_the_planner_command_plans_a_blt_config():
  # As a user runs it: common.plan is __main__ there, and the BLT builder is found through the config's import.
  proc = subprocess.run([sys.executable, "-m", "common.plan", f"--config={PAPER}:size=400m", "--mesh=fsdp:64",
                         "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout)
  assert out["fits"] and out["params_total"] == plan.make_plan(_config("400m"), {"fsdp": 64}).params_total
