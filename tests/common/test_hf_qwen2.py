"""Hugging Face Qwen2 import/export, checked against `transformers` itself: a tiny random Qwen2ForCausalLM
(GQA, q/k/v biases, tied and untied) gives the same logits and the same greedy continuation after import, on
one device and on an 8-device mesh, and what we export loads back in transformers tensor for tensor. Needs the
`hf` extra."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx

from common.config import ConfigError
from common.configs.base import dense_model
from common.flops import param_count
from common.generate import generate
from common.models import build_model
from common.models.hf_llama import save_hf_llama
from common.models.hf_qwen2 import load_hf_qwen2, save_hf_qwen2
from common.sharding import make_mesh
from common.tokenizers import HFTokenizer, model_special_ids
from tests.file_helpers import edited_checkpoint

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 300
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 40))
ATOL = 3e-6  # measured: 2.4e-7 of logits up to 0.63 in f32
# The fixture's sizes, also for the models built here: eager ops of the same shapes compile once.
SHAPE = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96)


def _hf_model(tied: bool, seed: int = 0, **overrides) -> transformers.Qwen2ForCausalLM:
  """A tiny random Qwen2 whose biases are random too (transformers initialises them to zero)."""
  torch.manual_seed(seed)
  config = transformers.Qwen2Config(**{**dict(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied,
      max_position_embeddings=128, bos_token_id=None, eos_token_id=None), **overrides})
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if name.endswith(".bias"):
        tensor.normal_(0.0, 0.5)
  return model


def _hf_logits(model, tokens=TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _logits(model, tokens=TOKENS) -> np.ndarray:
  return np.asarray(model(jnp.asarray(tokens)))


def _greedy_hf(model, prompt, new_tokens) -> list[int]:
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
  """(folder written by save_pretrained, the HF model, transformers' logits on TOKENS, tied)."""
  model = _hf_model(request.param)
  folder = tmp_path_factory.mktemp("qwen2")
  model.save_pretrained(folder)
  return str(folder), model, _hf_logits(model), request.param


def test_import_gives_the_logits_of_transformers(checkpoint):
  folder, hf_model, reference, tied = checkpoint
  cfg, model = load_hf_qwen2(folder)
  assert (cfg.qkv_bias, cfg.tie_embeddings, cfg.rope_theta, cfg.max_len, cfg.window) == (True, tied, 1e6, 128, 0)
  expected_bias = hf_model.model.layers[1].self_attn.k_proj.bias.detach().numpy()  # [kv_heads * head_dim]
  np.testing.assert_array_equal(np.asarray(model.blocks[1].attn.k_bias[...]).reshape(-1), expected_bias)
  assert np.abs(expected_bias).max() > 0.1  # the biases matter in the logits below
  n_params = sum(p.numel() for p in hf_model.parameters())
  assert param_count(cfg)["total"] == n_params
  np.testing.assert_allclose(_logits(model), reference, atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(checkpoint):
  folder, hf_model, _, _ = checkpoint
  _, model = load_hf_qwen2(folder)
  prompts = [[5, 17, 42, 9], [201, 3]]
  ours = generate(model, prompts, max_new_tokens=16)
  assert ours == [_greedy_hf(hf_model, prompt, 16) for prompt in prompts]


def test_import_onto_an_8_device_mesh_shards_and_keeps_the_logits(checkpoint):
  folder, _, reference, _ = checkpoint
  mesh = make_mesh((2, 4), ("fsdp", "tensor"))
  _, model = load_hf_qwen2(folder, mesh=mesh)
  q_bias = model.blocks[0].attn.q_bias[...]
  assert q_bias.sharding.spec == jax.sharding.PartitionSpec("tensor", None)
  assert q_bias.addressable_shards[0].data.shape == (1, 16)
  np.testing.assert_allclose(_logits(model), reference, atol=ATOL, rtol=0)


def test_export_loads_back_in_transformers_exactly(checkpoint, tmp_path):
  folder, hf_model, reference, tied = checkpoint
  cfg, model = load_hf_qwen2(folder)
  out = tmp_path / "export"
  save_hf_qwen2(cfg, model, str(out), max_shard_bytes=40_000)  # several shard files and an index
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1 and ("lm_head.weight" in index["weight_map"]) != tied
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
  original = hf_model.state_dict()
  assert sorted(reloaded.state_dict()) == sorted(original)
  for name, tensor in reloaded.state_dict().items():
    torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)
  np.testing.assert_allclose(_hf_logits(reloaded), reference, atol=0, rtol=0)


def test_a_native_model_exports_and_imports_exactly(tmp_path):
  """A DenseLM we initialised with q/k/v biases (made non-zero) round-trips bit for bit, and transformers
  computes our logits and our special ids from the export."""
  cfg = dense_model(**SHAPE, qkv_bias=True, rope_theta=1e6, tie_embeddings=True, norm_eps=1e-6, max_len=96, bos_id=5,
                    eos_ids=[6, 7])
  model = build_model(cfg, seed=3)
  rng = np.random.RandomState(0)
  for block in model.blocks:
    for bias in (block.attn.q_bias, block.attn.k_bias, block.attn.v_bias):
      bias[...] = rng.normal(size=bias.shape).astype(np.float32)
  save_hf_qwen2(cfg, model, str(tmp_path / "native"))
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "native").eval()
  assert (reloaded.config.bos_token_id, reloaded.generation_config.eos_token_id) == (5, [6, 7])
  np.testing.assert_allclose(_hf_logits(reloaded), _logits(model), atol=ATOL, rtol=0)
  cfg2, model2 = load_hf_qwen2(str(tmp_path / "native"))
  assert cfg2.to_dict() == cfg.to_dict()
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(model2, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_window_on_every_layer_imports_and_exports(tmp_path):
  """Qwen2 with max_window_layers 0 slides on every layer: our `model.window`, the same mask (TOKENS are
  longer than the window, so it cuts)."""
  hf_model = _hf_model(tied=True, seed=1, use_sliding_window=True, sliding_window=16, max_window_layers=0,
                       attn_implementation="eager")
  hf_model.save_pretrained(tmp_path / "hf")
  reference = _hf_logits(hf_model)
  cfg, model = load_hf_qwen2(str(tmp_path / "hf"))
  assert cfg.window == 16
  np.testing.assert_allclose(_logits(model), reference, atol=ATOL, rtol=0)
  full = edited_checkpoint(str(tmp_path / "hf"), tmp_path, use_sliding_window=False, layer_types=None)
  assert np.abs(_logits(load_hf_qwen2(full)[1]) - reference).max() > 1e-3  # the window matters at this length
  save_hf_qwen2(cfg, model, str(tmp_path / "export"))
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
  np.testing.assert_allclose(_hf_logits(reloaded.eval()), reference, atol=0, rtol=0)


@pytest.mark.parametrize("changes, message", [
    (dict(use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None), "'max_window_layers'"),
    (dict(layer_types=["full_attention", "sliding_attention"], sliding_window=16), "1 of 2 layers slide"),
    (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "unsupported architecture"),
    (dict(hidden_act="gelu"), "'hidden_act'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "rope_type 'yarn'"),
    (dict(num_hidden_layers=3, layer_types=None), "'model.layers.2.self_attn.k_proj.weight' is missing"),
])
def test_import_rejects_what_it_cannot_represent(checkpoint, tmp_path, changes, message):
  with pytest.raises(ConfigError, match=message):
    load_hf_qwen2(edited_checkpoint(checkpoint[0], tmp_path, **changes))


def test_export_refuses_the_other_architecture(tmp_path):
  """Qwen2 always has q/k/v biases, Llama never has them without an o_proj bias: each export refuses the
  other's model, naming the key."""
  plain = dense_model(vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
  abstract = lambda cfg: nnx.eval_shape(lambda: build_model(cfg, seed=0))  # refused before any weight is read
  with pytest.raises(ConfigError, match="model.qkv_bias"):
    save_hf_qwen2(plain, abstract(plain), str(tmp_path / "qwen2"))
  biased = dense_model(vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, qkv_bias=True)
  with pytest.raises(ConfigError, match="model.qkv_bias"):
    save_hf_llama(biased, abstract(biased), str(tmp_path / "llama"))
  assert not os.path.exists(tmp_path / "qwen2") and not os.path.exists(tmp_path / "llama")


def test_import_takes_the_special_ids_of_generation_config(checkpoint, tmp_path):
  """Qwen2.5 Instruct lists <|im_end|> and <|endoftext|> as eos in generation_config.json only."""
  folder = edited_checkpoint(checkpoint[0], tmp_path, eos_token_id=4)
  with open(os.path.join(folder, "generation_config.json"), "w") as f:
    json.dump(dict(bos_token_id=1, eos_token_id=[2, 7], pad_token_id=3), f)
  cfg, _ = load_hf_qwen2(folder)
  assert (cfg.max_len, cfg.bos_id, tuple(cfg.eos_ids), cfg.pad_id) == (128, 1, (2, 7), 3)


def test_export_with_a_tokenizer_writes_its_special_ids_and_import_reads_them_back(tmp_path):
  """A ChatML tokenizer folder (no bos, eos <|im_end|>, pad <|endoftext|>, <|endoftext|> a second stop id in
  its generation_config.json): transformers and our import of the export both stop on both ids."""
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator(["a tiny corpus for a tiny tokenizer"] * 4, tokenizers.trainers.BpeTrainer(
      vocab_size=280, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  (tmp_path / "tok").mkdir()
  bpe.save(str(tmp_path / "tok" / "tokenizer.json"))
  (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
  (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  tokenizer = HFTokenizer(str(tmp_path / "tok"))
  assert model_special_ids(tokenizer) == dict(bos_id=-1, eos_ids=[2, 0], pad_id=0)

  cfg = dense_model(**SHAPE, qkv_bias=True)
  save_hf_qwen2(cfg, build_model(cfg, seed=0), str(tmp_path / "export"), tokenizer=tokenizer)
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "export")
  assert (reloaded.generation_config.eos_token_id, reloaded.generation_config.pad_token_id) == ([2, 0], 0)
  assert reloaded.generation_config.bos_token_id is None
  cfg2, _ = load_hf_qwen2(str(tmp_path / "export"))
  assert (cfg2.bos_id, list(cfg2.eos_ids), cfg2.pad_id) == (-1, [2, 0], 0)
