"""Hugging Face decoder checkpoints (config.json + safetensors) in and out of the common dense LM: what the
Llama-shaped architectures (`hf_llama`, `hf_qwen2`) share. Each architecture module only translates its
config.json; the tensors map name by name through one table:

  HF name                                    HF layout              ours
  model.embed_tokens.weight                  [vocab, d]             embed.embedding [vocab, d]
  model.layers.N.self_attn.q_proj.weight     [heads*hd, d]          blocks.N.attn.q.kernel [d, heads, hd]
  model.layers.N.self_attn.k/v_proj.weight   [kv_heads*hd, d]       blocks.N.attn.k/v.kernel [d, kv_heads, hd]
  model.layers.N.self_attn.q/k/v_proj.bias   [(kv_)heads*hd]        blocks.N.attn.q/k/v_bias [(kv_)heads, hd]
  model.layers.N.self_attn.o_proj.weight     [d, heads*hd]          blocks.N.attn.o.kernel [heads*hd, d]
  model.layers.N.mlp.gate/up/down_proj.weight [out, in]             blocks.N.ffn.gate/up/down.kernel [in, out]
  model.layers.N.input_layernorm.weight      [d]                    blocks.N.attn_norm.scale
  model.layers.N.post_attention_layernorm.weight [d]                blocks.N.ffn_norm.scale
  model.norm.weight                          [d]                    final_norm.scale
  lm_head.weight (absent when tied)          [vocab, d]             lm_head.kernel [d, vocab]

The biases exist only in a model with `model.qkv_bias` (Qwen2). HF's RoPE rotates the halves (x[:hd/2],
x[hd/2:]) of each head, as `common.nn.rope.apply_rope` does, so q/k rows need no permutation (checkpoints
converted from Meta's interleaved layout were already permuted by HF).

Loading reads each tensor with `safetensors.safe_open` straight into the shards of its `NamedSharding`
(`jax.make_array_from_callback`): every device reads only its slice, so an 8B model never sits whole on one
host. With `pad_vocab=True` the vocabulary is rounded up to `padded_vocab_size` so it shards evenly; the
padded embedding rows and output columns are zero, hence their logits are exactly 0 and must be masked before
a softmax (`mask_padded_vocab`), as for any model whose `model.vocab_size` exceeds its tokenizer's.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from common.config import ConfigError
from common.configs.base import dense_model
from common.models.dense_lm import DenseLM, padded_vocab_size, unrolled
from common.sharding import state_shardings
from common.tokenizers import Tokenizer, check_tokenizer_fits, model_special_ids

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


# --- config.json <-> model config ---------------------------------------------------------------------


def _ids(value) -> list[int]:
  """An HF token id field (None, an int or a list of ints) as a list."""
  if value is None:
    return []
  return [int(i) for i in value] if isinstance(value, (list, tuple)) else [int(value)]


def _one_id(value) -> int:
  """An HF token id field as one id, -1 where there is none (the first of a list)."""
  ids = _ids(value)
  return ids[0] if ids else -1


def _rope_from_hf(hf: dict, path: str) -> tuple[float, dict]:
  """(theta, our rope_scaling) from the legacy `rope_theta` + `rope_scaling` keys or the `rope_parameters`
  dict of transformers >= 5; only the Llama 3.1 rule (rope_type 'llama3') and no scaling are supported."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or params
  theta = hf.get("rope_theta", params.get("rope_theta"))
  if theta is None:
    raise ConfigError(f"{path}: key 'rope_theta' is missing")
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return float(theta), {}
  if rope_type != "llama3":
    raise ConfigError(f"{path}: rope_type '{rope_type}' is not supported (only 'llama3' or 'default')")
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [k for k in keys if k not in scaling]
  if missing:
    raise ConfigError(f"{path}: llama3 rope scaling lacks key '{missing[0]}'")
  return float(theta), dict(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                            high_freq_factor=float(scaling["high_freq_factor"]),
                            original_max_len=int(scaling["original_max_position_embeddings"]))


def check_architecture(hf: dict, path: str, *, model_type: str, architecture: str) -> None:
  """Refuses a config.json of another architecture or with an activation other than SiLU."""
  archs = hf.get("architectures") or [architecture]
  if hf.get("model_type", model_type) != model_type or architecture not in archs:
    raise ConfigError(f"{path}: unsupported architecture {archs} (model_type '{hf.get('model_type')}'); "
                      f"only {architecture} is supported here")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{path}: key 'hidden_act' is {hf['hidden_act']!r}; the dense LM supports only 'silu'")


def dense_config_from_hf(hf: dict, *, path: str, dtype: str, pad_vocab: bool, generation: dict | None,
                         qkv_bias: bool) -> ml_collections.ConfigDict:
  """The `model.*` section for the keys Llama-shaped config.json files share (sizes, RoPE, norm, tying,
  context, special ids). The special ids of `generation` (generation_config.json) win over config.json's, as
  in transformers: a Llama 3 Instruct lists its end-of-turn ids there only."""
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
  missing = [k for k in required if k not in hf]
  if missing:
    raise ConfigError(f"{path}: key '{missing[0]}' is missing")
  theta, scaling = _rope_from_hf(hf, path)
  n_heads = int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or hf["hidden_size"] // n_heads)
  vocab = int(hf["vocab_size"])
  special = {**hf, **{k: v for k, v in (generation or {}).items() if v is not None}}
  return dense_model(
      vocab_size=padded_vocab_size(vocab) if pad_vocab else vocab, d_model=int(hf["hidden_size"]),
      n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      head_dim=0 if head_dim * n_heads == int(hf["hidden_size"]) else head_dim,
      d_ff=int(hf["intermediate_size"]), rope_theta=theta, rope_scaling=ml_collections.ConfigDict(scaling),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=qkv_bias, max_len=int(hf.get("max_position_embeddings") or 0),
      bos_id=_one_id(special.get("bos_token_id")), eos_ids=list(_ids(special.get("eos_token_id"))),
      pad_id=_one_id(special.get("pad_token_id")), dtype=dtype)


def dense_hf_config(m, *, architecture: str, vocab_size: int | None, max_position_embeddings: int | None,
                    dtype: str, has_window: bool = False) -> dict:
  """The config.json keys Llama-shaped architectures share, for a dense-LM `model.*` section; features the
  architecture lacks (a window unless `has_window`, QK-norm, MoE) are refused, naming the key.
  `max_position_embeddings` defaults to `model.max_len` (8192 where that is 0, unbounded). Special ids are
  written even where absent (None): transformers would otherwise fall back to Llama 2's bos 1 / eos 2."""
  if m.name != "dense_lm":
    raise ConfigError(f"config key 'model.name': only dense_lm exports to {architecture}, got '{m.name}'")
  for key, ok in (("window", has_window or not m.window), ("qk_norm", not m.get("qk_norm", False)),
                  ("moe.num_experts", not (m.get("moe") and int(m.moe.num_experts)))):
    if not ok:
      raise ConfigError(f"config key 'model.{key}': HF {architecture} has no such feature; cannot export")
  scaling = dict(m.rope_scaling or {})
  rope_scaling = None
  if scaling:
    rope_scaling = dict(rope_type="llama3", factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                        high_freq_factor=scaling["high_freq_factor"],
                        original_max_position_embeddings=int(scaling["original_max_len"]))
  return dict(
      architectures=[architecture], hidden_act="silu", vocab_size=int(vocab_size or m.vocab_size),
      hidden_size=int(m.d_model), intermediate_size=int(m.d_ff), num_hidden_layers=int(m.n_layers),
      num_attention_heads=int(m.n_heads), num_key_value_heads=int(m.n_kv_heads),
      head_dim=int(m.head_dim or m.d_model // m.n_heads), rms_norm_eps=float(m.norm_eps),
      rope_theta=float(m.rope_theta), rope_scaling=rope_scaling, tie_word_embeddings=bool(m.tie_embeddings),
      max_position_embeddings=int(max_position_embeddings or m.get("max_len", 0) or 8192), torch_dtype=dtype,
      **special_ids(m))


def special_ids(m) -> dict:
  """bos/eos/pad token ids of a `model.*` section as HF writes them: None where absent, eos a list when
  several (a Llama 3 Instruct stops on <|end_of_text|>, <|eom_id|> and <|eot_id|>)."""
  eos = [int(i) for i in m.get("eos_ids", ())]
  bos, pad = int(m.get("bos_id", -1)), int(m.get("pad_id", -1))
  return dict(bos_token_id=bos if bos >= 0 else None, eos_token_id=eos if len(eos) > 1 else (eos or [None])[0],
              pad_token_id=pad if pad >= 0 else None)


# --- tensor names and layouts ------------------------------------------------------------------------

# our path inside a block -> (HF name inside model.layers.N, kind); 'linear' is HF [out, in] vs our [in, *out],
# 'bias' HF [heads * head_dim] vs our [heads, head_dim].
_BLOCK_TENSORS = {
    ("attn", "q", "kernel"): ("self_attn.q_proj.weight", "linear"),
    ("attn", "k", "kernel"): ("self_attn.k_proj.weight", "linear"),
    ("attn", "v", "kernel"): ("self_attn.v_proj.weight", "linear"),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", "bias"),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", "bias"),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", "bias"),
    ("attn", "o", "kernel"): ("self_attn.o_proj.weight", "linear"),
    ("ffn", "gate", "kernel"): ("mlp.gate_proj.weight", "linear"),
    ("ffn", "up", "kernel"): ("mlp.up_proj.weight", "linear"),
    ("ffn", "down", "kernel"): ("mlp.down_proj.weight", "linear"),
    ("attn_norm", "scale"): ("input_layernorm.weight", "copy"),
    ("ffn_norm", "scale"): ("post_attention_layernorm.weight", "copy"),
}
_TOP_TENSORS = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "vocab_rows"),
    ("final_norm", "scale"): ("model.norm.weight", "copy"),
    ("lm_head", "kernel"): ("lm_head.weight", "vocab_cols"),
}


def hf_tensor_for(path: tuple) -> tuple[str, str]:
  """(HF tensor name, layout kind) of one of our parameter paths, e.g. ('blocks', 0, 'attn', 'q', 'kernel')."""
  if path[0] == "blocks":
    name, kind = _BLOCK_TENSORS[tuple(path[2:])]
    return f"model.layers.{path[1]}.{name}", kind
  return _TOP_TENSORS[tuple(path)]


def _key_path(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _span(index: slice, size: int) -> tuple[int, int]:
  start, stop, step = index.indices(size)
  assert step == 1, "shardings only ever cut contiguous blocks"
  return start, stop


def _read_block(tensor, kind: str, shape: tuple, index: tuple, hf_vocab: int) -> np.ndarray:
  """Our array's block `index` (a tuple of slices of `shape`), read from the HF tensor slice handle."""
  if kind == "copy":
    return np.asarray(tensor[index])
  if kind == "bias":  # HF [heads * head_dim] -> ours [heads, head_dim]
    lo, hi = _span(index[0], shape[0])
    return np.asarray(tensor[lo * shape[1]:hi * shape[1]]).reshape(hi - lo, shape[1])[:, index[1]]
  if kind in ("vocab_rows", "vocab_cols"):
    vocab_axis = 0 if kind == "vocab_rows" else 1
    lo, hi = _span(index[vocab_axis], shape[vocab_axis])
    other = index[1 - vocab_axis]
    rows = np.asarray(tensor[lo:min(hi, hf_vocab), other]) if lo < hf_vocab else None
    width = len(range(*other.indices(shape[1 - vocab_axis])))
    pad = np.zeros((max(0, hi - max(lo, hf_vocab)), width), np.float32)  # padded vocabulary: zero rows
    block = pad if rows is None else np.concatenate([rows.astype(np.float32), pad])
    return block if kind == "vocab_rows" else block.T
  # linear: HF [out, in] with out = prod(shape[1:]) (e.g. heads * head_dim) -> ours [in, *out_shape].
  inner = math.prod(shape[2:])
  lo, hi = _span(index[1], shape[1])
  block = np.asarray(tensor[lo * inner:hi * inner, index[0]])  # [rows, in block]
  block = block.reshape(hi - lo, *shape[2:], -1)[(slice(None), *index[2:])]
  return np.moveaxis(block, -1, 0)


class _SafetensorsReader(contextlib.ExitStack):
  """Opens the shards of an HF checkpoint folder lazily; `slice(name)` is a lazily read tensor handle."""

  def __init__(self, folder: str):
    super().__init__()
    self._handles: dict[str, Any] = {}
    self.folder = folder
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        try:
          self.files = dict(json.load(f)["weight_map"])
        except (ValueError, KeyError, TypeError):
          raise ConfigError(f"'{index_path}': not a safetensors index (no 'weight_map')") from None
    elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
      self.files = {name: SINGLE_FILE for name in self._handle(SINGLE_FILE).keys()}
    else:
      raise ConfigError(f"'{folder}': no {SINGLE_FILE} or {INDEX_FILE}")

  def _handle(self, filename: str):
    if filename not in self._handles:
      path = os.path.join(self.folder, filename)
      if not os.path.isfile(path):
        raise ConfigError(f"'{path}': safetensors shard named in the index is missing")
      # framework 'flax' because numpy has no bfloat16 (the dtype of released Llama weights).
      self._handles[filename] = self.enter_context(safe_open(path, framework="flax"))
    return self._handles[filename]

  def slice(self, name: str):
    if name not in self.files:
      raise ConfigError(f"'{self.folder}': tensor '{name}' is missing from the checkpoint")
    return self._handle(self.files[name]).get_slice(name)


def _hf_shape(kind: str, shape: tuple, hf_vocab: int) -> tuple:
  if kind == "copy":
    return shape
  if kind == "bias":
    return (math.prod(shape),)
  if kind == "vocab_rows":
    return (hf_vocab, shape[1])
  if kind == "vocab_cols":
    return (hf_vocab, shape[0])
  return (math.prod(shape[1:]), shape[0])


def _read_json(path: str) -> dict:
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ConfigError(f"'{path}': not JSON ({e})") from None


ConfigFromHF = Callable[..., ml_collections.ConfigDict]


def load_hf_checkpoint(path: str, config_from_hf: ConfigFromHF, *, what: str, mesh: Mesh | None = None,
                       dtype: str = "float32", pad_vocab: bool = False) -> tuple[ml_collections.ConfigDict, DenseLM]:
  """(model config, DenseLM) from a local HF checkpoint folder whose config.json `config_from_hf(hf, path=,
  dtype=, pad_vocab=, generation=)` translates (`what` names the architecture in errors). Parameters (f32)
  land on `mesh` sharded by `common.sharding`, or on the first device; `dtype` is the compute dtype."""
  path = os.path.expanduser(path)
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise ConfigError(f"'{config_path}': no such file (expected a Hugging Face {what} checkpoint folder)")
  hf = _read_json(config_path)
  generation_path = os.path.join(path, GENERATION_CONFIG_FILE)
  generation = _read_json(generation_path) if os.path.isfile(generation_path) else None
  cfg = config_from_hf(hf, path=config_path, dtype=dtype, pad_vocab=pad_vocab, generation=generation)
  hf_vocab = int(hf["vocab_size"])
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DenseLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  if mesh is None:
    shardings = jax.tree.map(lambda v: v.replace(SingleDeviceSharding(jax.devices()[0])), abstract,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
  else:
    shardings = state_shardings(abstract, mesh)

  # Slices are staged on the host CPU, then copied to the devices that hold them.
  with _SafetensorsReader(path) as reader, jax.default_device(jax.local_devices(backend="cpu")[0]):
    def load_one(key_path, variable: nnx.Variable, sharding: nnx.Variable) -> nnx.Variable:
      name, kind = hf_tensor_for(_key_path(key_path))
      shape = tuple(variable.get_value().shape)
      tensor = reader.slice(name)
      expected = _hf_shape(kind, shape, hf_vocab)
      if tuple(tensor.get_shape()) != expected:
        raise ConfigError(f"'{path}': tensor '{name}' has shape {tuple(tensor.get_shape())}, config.json "
                          f"implies {expected}")
      read = lambda index: _read_block(tensor, kind, shape, index, hf_vocab).astype(np.float32)
      return variable.replace(jax.make_array_from_callback(shape, sharding.get_value(), read))
    params = jax.tree_util.tree_map_with_path(load_one, abstract, shardings,
                                              is_leaf=lambda x: isinstance(x, nnx.Variable))
  return cfg, nnx.merge(graphdef, params)


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
  """Logits [..., padded_vocab] with the ids >= `vocab_size` set to -inf (they do not exist)."""
  ids = jnp.arange(logits.shape[-1])
  return jnp.where(ids < vocab_size, logits, -jnp.inf)


# --- export ------------------------------------------------------------------------------------------


def _to_hf(value: np.ndarray, kind: str, vocab: int) -> np.ndarray:
  if kind == "copy":
    return value
  if kind == "bias":
    return value.reshape(-1)
  if kind == "vocab_rows":
    return value[:vocab]
  if kind == "vocab_cols":
    return value.T[:vocab]
  return value.reshape(value.shape[0], -1).T


def _host_value(value: jax.Array) -> np.ndarray:
  if value.is_fully_addressable:
    return np.asarray(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def _plan_shards(tensors: dict[str, tuple[tuple, Callable]], itemsize: int, max_bytes: int) -> list[list[str]]:
  """Tensor names grouped in order into files of at most `max_bytes` (a bigger tensor gets its own)."""
  groups, size = [[]], 0
  for name, (shape, _) in tensors.items():
    nbytes = math.prod(shape) * itemsize
    if groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += nbytes
  return groups


def check_export_target(model_cfg, path: str, *, vocab_size: int | None, dtype: str) -> tuple[str, int]:
  """(expanded path, vocabulary to write), refusing a path that exists and is not an empty folder, a dtype
  other than float32/bfloat16 and a vocabulary past the model's."""
  path = os.path.expanduser(path)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ConfigError(f"'{path}': exists and is not an empty folder; refusing to overwrite")
  if dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype '{dtype}': expected float32 or bfloat16")
  vocab = int(vocab_size or model_cfg.vocab_size)
  if vocab > model_cfg.vocab_size:
    raise ConfigError(f"vocab_size {vocab} exceeds model.vocab_size {model_cfg.vocab_size}")
  return path, vocab


def write_hf_checkpoint(model: nnx.Module, path: str, hf_config: dict, *, dtype: str = "float32",
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_config: dict | None = None,
                        tokenizer: Tokenizer | None = None) -> None:
  """Writes config.json (`hf_config` + `extra_config`), generation_config.json and model.safetensors (or
  numbered shards plus model.safetensors.index.json above `max_shard_bytes`) into `path` (checked by
  `check_export_target`). The special ids are `hf_config`'s, or those of `tokenizer` where given (its bos,
  its stop ids as eos, its pad); the generation config follows config.json's ids. Tensors are gathered one
  shard file at a time; only process 0 writes."""
  if isinstance(model, DenseLM):
    model = unrolled(model)  # Hugging Face names one tensor per layer
  vocab = int(hf_config["vocab_size"])
  hf_config = dict(hf_config)
  if tokenizer is not None:
    check_tokenizer_fits(tokenizer, vocab)
    hf_config.update(special_ids(model_special_ids(tokenizer)))
  hf_config.update(extra_config or {})
  generation = {k: hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  np_dtype = np.float32 if dtype == "float32" else jnp.bfloat16

  tensors: dict[str, tuple[tuple, Callable]] = {}
  def collect(key_path, variable):
    name, kind = hf_tensor_for(_key_path(key_path))
    value = variable.get_value()
    tensors[name] = (_hf_shape(kind, tuple(value.shape), vocab),
                     lambda: np.ascontiguousarray(_to_hf(_host_value(value), kind, vocab), np_dtype))
    return variable
  jax.tree_util.tree_map_with_path(collect, nnx.state(model, nnx.Param),
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
  tensors = dict(sorted(tensors.items(), key=lambda item: _natural_key(item[0])))

  groups = _plan_shards(tensors, np.dtype(np_dtype).itemsize, max_shard_bytes)
  names = [SINGLE_FILE] if len(groups) == 1 else [
      f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
  for filename, group in zip(names, groups):
    arrays = {name: tensors[name][1]() for name in group}  # every process joins the gathers
    if writer:
      save_file(arrays, os.path.join(path, filename), metadata={"format": "pt"})
  if not writer:
    return
  if len(groups) > 1:
    total = sum(math.prod(shape) for shape, _ in tensors.values()) * np.dtype(np_dtype).itemsize
    index = {"metadata": {"total_size": total},
             "weight_map": {name: filename for filename, group in zip(names, groups) for name in group}}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2)
  with open(os.path.join(path, GENERATION_CONFIG_FILE), "w") as f:
    json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)


def _natural_key(name: str) -> tuple:
  """Sorts model.layers.10 after model.layers.9, so shard files hold consecutive layers."""
  return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))
