"""Hugging Face Llama import/export, checked against `transformers` itself: a tiny random LlamaForCausalLM
(GQA, Llama 3.1 RoPE scaling, tied and untied) gives the same logits after import, on one device and on an
8-device mesh, and what we export loads back in transformers with the same logits. Needs the `hf` extra."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from common.config import ConfigError
from common.configs.base import dense_model
from common.generate import generate
from common.models import build_model
from common.models.hf_llama import load_hf_llama, mask_padded_vocab, save_hf_llama
from common.sharding import make_mesh
from tests.file_helpers import edited_checkpoint

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 300
# original context 64 with theta 1e4 and head_dim 16 puts RoPE frequencies in all three bands of the
# Llama 3.1 rule (kept, interpolated, divided by the factor).
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 40))
ATOL = 3e-6  # measured: at most 3.6e-7 of logits up to 1.6 in f32


def _hf_model(tied: bool, seed: int = 0) -> transformers.LlamaForCausalLM:
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE), rms_norm_eps=1e-6,
      tie_word_embeddings=tied)
  return transformers.LlamaForCausalLM(config).eval()


def _hf_logits(model: transformers.LlamaForCausalLM, tokens=TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _logits(model, tokens=TOKENS) -> np.ndarray:
  return np.asarray(model(jnp.asarray(tokens)))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
  """(folder written by save_pretrained, transformers' logits on TOKENS, tied)."""
  model = _hf_model(request.param)
  folder = tmp_path_factory.mktemp("hf")
  model.save_pretrained(folder)
  return str(folder), _hf_logits(model), request.param


def test_import_gives_the_logits_of_transformers(checkpoint):
  folder, reference, tied = checkpoint
  cfg, model = load_hf_llama(folder)
  assert (cfg.tie_embeddings, cfg.n_kv_heads, cfg.norm_eps, cfg.rope_scaling.original_max_len) == (tied, 2, 1e-6, 64)
  assert (model.lm_head is None) == tied
  np.testing.assert_allclose(_logits(model), reference, atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(checkpoint):
  """Also the stopping: transformers stops on the eos id of config.json (2, LlamaConfig's default), which
  the import keeps in model.eos_ids."""
  folder, _, _ = checkpoint
  cfg, model = load_hf_llama(folder)
  reference = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
  prompts = [[5, 17, 42, 9], [201, 3], [2, 2]]
  expected = [_greedy_hf(reference, p, 16) for p in prompts]
  assert any(2 in row for row in expected)  # some row stops early
  assert generate(model, prompts, max_new_tokens=16, stop_ids=cfg.eos_ids) == [
      row[:row.index(2)] if 2 in row else row for row in expected]  # transformers keeps the eos, we do not


def test_parity_depends_on_the_llama3_rope_scaling(checkpoint, tmp_path):
  """Guards the test above: the same weights with plain RoPE give visibly different logits."""
  folder, reference, _ = checkpoint
  plain = tmp_path / "plain"
  shutil.copytree(folder, plain)
  hf = json.loads((plain / "config.json").read_text())
  hf.pop("rope_scaling", None)
  hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
  (plain / "config.json").write_text(json.dumps(hf))
  _, model = load_hf_llama(str(plain))
  assert np.abs(_logits(model) - reference).max() > 1e-3


def test_import_onto_an_8_device_mesh_shards_and_keeps_the_logits(checkpoint):
  folder, reference, _ = checkpoint
  mesh = make_mesh((2, 4), ("fsdp", "tensor"))
  _, model = load_hf_llama(folder, mesh=mesh)
  q = model.blocks[0].attn.q.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 1, 16)
  np.testing.assert_allclose(_logits(model), reference, atol=ATOL, rtol=0)


def test_export_loads_back_in_transformers(checkpoint, tmp_path):
  folder, reference, tied = checkpoint
  cfg, model = load_hf_llama(folder)
  out = tmp_path / "export"
  save_hf_llama(cfg, model, str(out), max_shard_bytes=40_000)  # several shard files and an index
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1 and ("lm_head.weight" in index["weight_map"]) != tied
  reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(_hf_logits(reloaded), reference, atol=ATOL, rtol=0)


def test_a_native_model_exports_and_imports_exactly(tmp_path):
  """A DenseLM we initialised (head_dim not d_model / heads) round-trips bit for bit, and transformers
  computes our logits from the export."""
  cfg = dense_model(vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=80,
                    rope_theta=5000.0, tie_embeddings=False, norm_eps=1e-5, max_len=96, bos_id=5, eos_ids=[6])
  cfg.rope_scaling.update(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=32)
  model = build_model(cfg, seed=3)
  save_hf_llama(cfg, model, str(tmp_path / "native"))
  assert sorted(os.listdir(tmp_path / "native")) == ["config.json", "generation_config.json", "model.safetensors"]
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "native").eval()
  assert (reloaded.config.bos_token_id, reloaded.config.eos_token_id, reloaded.config.head_dim) == (5, 6, 16)
  assert reloaded.config.max_position_embeddings == 96
  np.testing.assert_allclose(_hf_logits(reloaded), _logits(model), atol=ATOL, rtol=0)
  cfg2, model2 = load_hf_llama(str(tmp_path / "native"))
  assert cfg2.to_dict() == cfg.to_dict()
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(model2, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_padded_vocabulary_is_zero_and_masked_away(tmp_path):
  hf_model = _hf_model(tied=False, seed=1)
  hf_model.save_pretrained(tmp_path / "hf")
  reference = _hf_logits(hf_model)
  mesh = make_mesh((1, 8), ("fsdp", "tensor"))  # 384 / 8 rows each: the last shard is all padding
  cfg, model = load_hf_llama(str(tmp_path / "hf"), pad_vocab=True, mesh=mesh)
  assert cfg.vocab_size == 384
  logits = _logits(model)
  np.testing.assert_allclose(logits[..., :VOCAB], reference, atol=ATOL, rtol=0)
  assert not logits[..., VOCAB:].any()
  masked = jax.nn.log_softmax(mask_padded_vocab(jnp.asarray(logits), VOCAB))
  np.testing.assert_allclose(np.asarray(masked)[..., :VOCAB], jax.nn.log_softmax(reference), atol=ATOL)
  save_hf_llama(cfg, model, str(tmp_path / "export"), vocab_size=VOCAB)
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
  assert reloaded.config.vocab_size == VOCAB
  np.testing.assert_allclose(_hf_logits(reloaded), reference, atol=ATOL, rtol=0)


def test_bfloat16_checkpoints_import_exactly(tmp_path):
  """Real Llama 3 weights are bf16; they widen to our f32 parameters without change."""
  hf_model = _hf_model(tied=True, seed=2).to(torch.bfloat16)
  hf_model.save_pretrained(tmp_path / "bf16")
  _, model = load_hf_llama(str(tmp_path / "bf16"))
  expected = hf_model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()  # [kv_heads * head_dim, d]
  ours = np.asarray(model.blocks[1].attn.k.kernel[...])  # [d, kv_heads, head_dim]
  np.testing.assert_array_equal(ours.reshape(64, -1).T, expected)


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'yarn'"),
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "unsupported architecture"),
    (dict(attention_bias=True), "'attention_bias'"),
    (dict(num_hidden_layers=3), "'model.layers.2.self_attn.k_proj.weight' is missing"),
    (dict(intermediate_size=128), "'model.layers.0.mlp.down_proj.weight' has shape"),
])
def test_import_rejects_what_it_cannot_represent(checkpoint, tmp_path, changes, message):
  with pytest.raises(ConfigError, match=message):
    load_hf_llama(edited_checkpoint(checkpoint[0], tmp_path, **changes))


def test_import_names_missing_files(tmp_path):
  with pytest.raises(ConfigError, match="config.json'"):
    load_hf_llama(str(tmp_path))
  _hf_model(tied=True).config.save_pretrained(tmp_path)
  with pytest.raises(ConfigError, match="no model.safetensors or model.safetensors.index.json"):
    load_hf_llama(str(tmp_path))


def test_export_refuses_a_non_empty_folder_and_unsupported_features(tmp_path):
  cfg = dense_model(vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
  model = build_model(cfg, seed=0)
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  with pytest.raises(ConfigError, match="refusing to overwrite"):
    save_hf_llama(cfg, model, str(tmp_path / "taken"))
  assert os.listdir(tmp_path / "taken") == ["keep.txt"]
  cfg.window = 16
  with pytest.raises(ConfigError, match="model.window"):
    save_hf_llama(cfg, model, str(tmp_path / "windowed"))


def _greedy_hf(model, prompt, new_tokens):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
  return out[0, len(prompt):].tolist()


def test_export_keeps_the_eos_ids_so_transformers_stops_there(tmp_path):
  """Without them transformers falls back to Llama 2's eos 2 and runs to max_new_tokens. The ids live in
  generation_config.json (eos a list when several, as Llama 3 Instruct's) and come back on import."""
  cfg = dense_model(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, tie_embeddings=False,
                    max_len=64)
  model = build_model(cfg, seed=0)
  prompt = [3, 17, 42]
  save_hf_llama(cfg, model, str(tmp_path / "plain"))
  free = _greedy_hf(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "plain").eval(), prompt, 12)
  assert len(free) == 12
  cut = next(i for i in range(2, 12) if free[i] not in free[:i] and free[i] != 2)  # a first occurrence
  cfg.update(dict(bos_id=3, eos_ids=[free[cut], VOCAB - 1]))
  save_hf_llama(cfg, model, str(tmp_path / "eos"))
  generation = json.loads((tmp_path / "eos" / "generation_config.json").read_text())
  assert generation == dict(bos_token_id=3, eos_token_id=[free[cut], VOCAB - 1])
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "eos").eval()
  assert _greedy_hf(reloaded, prompt, 12) == free[:cut + 1]  # stops on (and keeps) its eos
  cfg2, _ = load_hf_llama(str(tmp_path / "eos"))
  assert (cfg2.bos_id, tuple(cfg2.eos_ids), cfg2.pad_id, cfg2.max_len) == (3, (free[cut], VOCAB - 1), -1, 64)


def test_import_takes_the_special_ids_of_generation_config(checkpoint, tmp_path):
  folder = edited_checkpoint(checkpoint[0], tmp_path, max_position_embeddings=512, pad_token_id=0)
  with open(os.path.join(folder, "generation_config.json"), "w") as f:
    json.dump(dict(bos_token_id=1, eos_token_id=[2, 7, 9]), f)
  cfg, _ = load_hf_llama(folder)
  assert (cfg.max_len, cfg.bos_id, tuple(cfg.eos_ids), cfg.pad_id) == (512, 1, (2, 7, 9), 0)
