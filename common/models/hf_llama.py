"""Hugging Face Llama checkpoints (config.json + safetensors) in and out of the common dense LM.

Llama 3 (Dubey et al. 2024, "The Llama 3 Herd of Models", section 3.1.1) is the dense LM of
`common.models.dense_lm` with grouped-query attention, RoPE with the Llama 3.1 frequency scaling, RMSNorm and
SwiGLU, so a checkpoint maps tensor by tensor (the table and the sharded reading and writing are
`common.models.hf_convert`'s); this module translates LlamaForCausalLM's config.json.
"""
from __future__ import annotations

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from common.config import ConfigError
from common.models.dense_lm import DenseLM
from common.models.hf_convert import (CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, check_architecture,
                                      check_export_target, dense_config_from_hf, dense_hf_config,
                                      load_hf_checkpoint, mask_padded_vocab, write_hf_checkpoint)
from common.tokenizers import Tokenizer

__all__ = ["hf_config_from_model", "load_hf_llama", "mask_padded_vocab", "model_config_from_hf", "save_hf_llama"]


def model_config_from_hf(hf: dict, *, path: str = CONFIG_FILE, dtype: str = "float32", pad_vocab: bool = False,
                         generation: dict | None = None) -> ml_collections.ConfigDict:
  """The `model.*` section of the dense LM for a Hugging Face Llama config.json (as a dict); the special ids
  of `generation` (generation_config.json) win over config.json's."""
  check_architecture(hf, path, model_type="llama", architecture="LlamaForCausalLM")
  for key in ("attention_bias", "mlp_bias"):  # Llama's attention_bias covers o_proj too, which we lack
    if hf.get(key, False) is not False:
      raise ConfigError(f"{path}: key '{key}' is {hf[key]!r}; the dense LM supports only False")
  return dense_config_from_hf(hf, path=path, dtype=dtype, pad_vocab=pad_vocab, generation=generation,
                              qkv_bias=False)


def hf_config_from_model(m, *, vocab_size: int | None = None, max_position_embeddings: int | None = None,
                         dtype: str = "float32") -> dict:
  """config.json for a dense-LM `model.*` section; features HF Llama lacks are refused, naming the key."""
  if m.get("qkv_bias", False):
    raise ConfigError("config key 'model.qkv_bias': HF LlamaForCausalLM has no q/k/v-only biases; export it "
                      "with common.models.hf_qwen2.save_hf_qwen2")
  hf = dense_hf_config(m, architecture="LlamaForCausalLM", vocab_size=vocab_size,
                       max_position_embeddings=max_position_embeddings, dtype=dtype)
  return dict(hf, model_type="llama", attention_bias=False, mlp_bias=False)


def load_hf_llama(path: str, *, mesh: Mesh | None = None, dtype: str = "float32",
                  pad_vocab: bool = False) -> tuple[ml_collections.ConfigDict, DenseLM]:
  """(model config, DenseLM) from a local HF Llama folder; parameters (f32) land on `mesh` sharded by
  `common.sharding`, or on the first device. `dtype` is the compute dtype (`model.dtype`). The config keeps
  the context length and the special ids (of generation_config.json where there is one)."""
  return load_hf_checkpoint(path, model_config_from_hf, what="Llama", mesh=mesh, dtype=dtype, pad_vocab=pad_vocab)


def save_hf_llama(model_cfg, model: nnx.Module, path: str, *, vocab_size: int | None = None,
                  dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  max_position_embeddings: int | None = None, extra_config: dict | None = None,
                  tokenizer: Tokenizer | None = None) -> None:
  """Writes a folder that `transformers.LlamaForCausalLM.from_pretrained(path)` loads and generates with
  (`hf_convert.write_hf_checkpoint`). `vocab_size` drops the padded rows of a model trained with a padded
  vocabulary. Refuses a path that exists and is not an empty folder."""
  path, vocab = check_export_target(model_cfg, path, vocab_size=vocab_size, dtype=dtype)
  hf_config = hf_config_from_model(model_cfg, vocab_size=vocab, max_position_embeddings=max_position_embeddings,
                                   dtype=dtype)
  write_hf_checkpoint(model, path, hf_config, dtype=dtype, max_shard_bytes=max_shard_bytes,
                      extra_config=extra_config, tokenizer=tokenizer)
