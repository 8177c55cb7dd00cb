"""Hugging Face Qwen2 / Qwen2.5 checkpoints (config.json + safetensors) in and out of the common dense LM.

Qwen2 (Yang et al. 2024, "Qwen2 Technical Report", section 2.2) is Llama's decoder (GQA, RoPE, RMSNorm,
SwiGLU) with biases on the query, key and value projections (`model.qkv_bias`), a large RoPE base (1e6) and,
in the small models, tied embeddings; Qwen2.5 keeps the architecture. Tensors map as in
`common.models.hf_convert` (plus `self_attn.q/k/v_proj.bias`). Qwen2's optional sliding window covers the
layers from `max_window_layers` on; the dense LM has one window for all layers, so a checkpoint imports when
no layer or every layer slides, and a mixed one is refused naming the key.
"""
from __future__ import annotations

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from common.config import ConfigError
from common.models.dense_lm import DenseLM
from common.models.hf_convert import (CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, check_architecture,
                                      check_export_target, dense_config_from_hf, dense_hf_config,
                                      load_hf_checkpoint, write_hf_checkpoint)
from common.tokenizers import Tokenizer

SLIDING, FULL = "sliding_attention", "full_attention"


def _layer_types(hf: dict) -> list[str]:
  """Each layer's attention as transformers builds it: `layer_types` where written, else sliding from layer
  `max_window_layers` on when `use_sliding_window`."""
  n_layers = int(hf["num_hidden_layers"])
  if hf.get("layer_types"):
    return list(hf["layer_types"])
  first_sliding = int(hf.get("max_window_layers", n_layers)) if hf.get("use_sliding_window") else n_layers
  return [SLIDING if i >= first_sliding else FULL for i in range(n_layers)]


def _window_from_hf(hf: dict, path: str) -> int:
  types = _layer_types(hf)
  if SLIDING not in types:
    return 0
  if FULL in types:
    raise ConfigError(f"{path}: key 'max_window_layers' ({hf.get('max_window_layers')}) makes "
                      f"{types.count(SLIDING)} of {len(types)} layers slide; the dense LM has one window for all "
                      "layers (set use_sliding_window false to import with full attention)")
  if not hf.get("sliding_window"):
    raise ConfigError(f"{path}: key 'sliding_window' is missing or 0 while layers slide")
  return int(hf["sliding_window"])


def model_config_from_hf(hf: dict, *, path: str = CONFIG_FILE, dtype: str = "float32", pad_vocab: bool = False,
                         generation: dict | None = None) -> ml_collections.ConfigDict:
  """The `model.*` section of the dense LM for a Hugging Face Qwen2 config.json (as a dict); the special ids
  of `generation` (generation_config.json) win over config.json's."""
  check_architecture(hf, path, model_type="qwen2", architecture="Qwen2ForCausalLM")
  if "num_hidden_layers" not in hf:
    raise ConfigError(f"{path}: key 'num_hidden_layers' is missing")
  window = _window_from_hf(hf, path)
  cfg = dense_config_from_hf(hf, path=path, dtype=dtype, pad_vocab=pad_vocab, generation=generation,
                             qkv_bias=True)
  cfg.window = window
  return cfg


def hf_config_from_model(m, *, vocab_size: int | None = None, max_position_embeddings: int | None = None,
                         dtype: str = "float32") -> dict:
  """config.json for a dense-LM `model.*` section with `model.qkv_bias` (Qwen2 always has the biases);
  `model.window` becomes a window on every layer."""
  if not m.get("qkv_bias", False):
    raise ConfigError("config key 'model.qkv_bias': HF Qwen2ForCausalLM has q/k/v biases and this model has "
                      "none; export it with common.models.hf_llama.save_hf_llama")
  hf = dense_hf_config(m, architecture="Qwen2ForCausalLM", vocab_size=vocab_size,
                       max_position_embeddings=max_position_embeddings, dtype=dtype, has_window=True)
  window = int(m.window)
  return dict(hf, model_type="qwen2", use_sliding_window=bool(window), sliding_window=window or None,
              max_window_layers=0 if window else int(m.n_layers),
              layer_types=[SLIDING if window else FULL] * int(m.n_layers))


def load_hf_qwen2(path: str, *, mesh: Mesh | None = None, dtype: str = "float32",
                  pad_vocab: bool = False) -> tuple[ml_collections.ConfigDict, DenseLM]:
  """(model config, DenseLM) from a local HF Qwen2 / Qwen2.5 folder; parameters (f32) land on `mesh` sharded
  by `common.sharding`, or on the first device. `dtype` is the compute dtype (`model.dtype`). The config keeps
  the context length and the special ids (of generation_config.json where there is one)."""
  return load_hf_checkpoint(path, model_config_from_hf, what="Qwen2", mesh=mesh, dtype=dtype, pad_vocab=pad_vocab)


def save_hf_qwen2(model_cfg, model: nnx.Module, path: str, *, vocab_size: int | None = None,
                  dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  max_position_embeddings: int | None = None, extra_config: dict | None = None,
                  tokenizer: Tokenizer | None = None) -> None:
  """Writes a folder that `transformers.Qwen2ForCausalLM.from_pretrained(path)` loads and generates with
  (`hf_convert.write_hf_checkpoint`); arguments as `hf_llama.save_hf_llama`'s."""
  path, vocab = check_export_target(model_cfg, path, vocab_size=vocab_size, dtype=dtype)
  hf_config = hf_config_from_model(model_cfg, vocab_size=vocab, max_position_embeddings=max_position_embeddings,
                                   dtype=dtype)
  write_hf_checkpoint(model, path, hf_config, dtype=dtype, max_shard_bytes=max_shard_bytes,
                      extra_config=extra_config, tokenizer=tokenizer)
