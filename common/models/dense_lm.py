"""The Llama-3-style dense decoder LM: embeddings, N pre-norm blocks (GQA attention with RoPE, SwiGLU),
final RMSNorm, tied or untied output projection. The token baseline of the scaling papers and the base
model of the fine-tuning papers.

With `model.moe.num_experts > 0` every `model.moe.every`-th block (layers every-1, 2*every-1, ..., as fairseq's
`--moe-freq`; Artetxe et al. 2021 use every other layer) takes a mixture-of-experts FFN (`common.nn.moe.MoE`)
instead of the SwiGLU. Its auxiliary losses are sown into `nnx.Intermediate`; a loss function collects them
with `common.nn.moe.moe_loss_terms(model, weight)` after the forward pass.

Scale options (MaxText's names): `model.scan_layers` stacks the blocks' parameters on a leading 'layers' axis
and runs one `jax.lax.scan` over them, so the compiled program (and its compile time) does not grow with the
depth; `model.remat` picks what the backward pass recomputes (`REMAT_POLICIES`); `model.param_dtype` stores
the parameters in bfloat16 (the compute dtype stays `model.dtype`).

The forward pass and the cached decode take an optional per-key attention bias `key_bias` [batch, length], the
same in every layer and head (`common.nn.attention`): EASE's abstractor reads a document through it."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import ConfigError, require
from common.nn import DTYPES, Block, BlockSpec, Embed, Linear, RMSNorm
from common.nn.kv_cache import KVCache, decode_blocks, init_caches
from common.nn.moe import MoE, MoESettings
from common.kernels.grouped_matmul.ops import IMPLS as GROUPED_IMPLS
from common.nn.moe.forward import MODES, ROUTINGS, SECOND_POLICIES

REMAT_POLICIES = {
    "none": None,  # keep every activation of the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # keep each block's input only, recompute the rest
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs too
}


def remat_policy_name(m) -> str:
  """`model.remat` as a key of REMAT_POLICIES; true/false (configs written before the policies) mean
  'full'/'none'."""
  value = m.get("remat", False)
  if isinstance(value, bool):
    return "full" if value else "none"
  require(isinstance(value, str) and value in REMAT_POLICIES, "model.remat",
          f"must be one of {sorted(REMAT_POLICIES)} (or true/false), got {value!r}")
  return value


def padded_vocab_size(size: int, multiple: int = 128) -> int:
  """`model.vocab_size` 0 means the data vocabulary rounded up to a multiple of 128, so it shards evenly."""
  return -(-size // multiple) * multiple


def validate_model_config(m) -> None:
  """Checks shapes once, naming the offending key."""
  for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
    require(int(m[key]) > 0, f"model.{key}", f"must be positive, got {m[key]}")
  if not m.head_dim:
    require(m.d_model % m.n_heads == 0, "model.d_model",
            f"{m.d_model} is not divisible by model.n_heads={m.n_heads}")
  require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
          f"model.n_heads={m.n_heads} is not a multiple of {m.n_kv_heads}")
  head_dim = m.head_dim or m.d_model // m.n_heads
  require(head_dim % 2 == 0, "model.head_dim", f"RoPE needs an even head_dim, got {head_dim}")
  require(m.dtype in DTYPES, "model.dtype", f"must be one of {sorted(DTYPES)}, got '{m.dtype}'")
  param_dtype = m.get("param_dtype", "float32")
  require(param_dtype in DTYPES, "model.param_dtype", f"must be one of {sorted(DTYPES)}, got '{param_dtype}'")
  remat_policy_name(m)
  scan = m.get("scan_layers", False)
  require(isinstance(scan, bool), "model.scan_layers", f"must be true or false, got {scan!r}")
  moe = m.get("moe")
  require(not (scan and moe and int(moe.num_experts) > 0), "model.scan_layers",
          "scanned layers must all be alike; MoE layers (model.moe.num_experts > 0) need scan_layers=false")
  require(m.window >= 0, "model.window", f"must be >= 0 (0 = full causal), got {m.window}")
  require(isinstance(m.get("qkv_bias", False), bool), "model.qkv_bias",
          f"must be true or false, got {m.get('qkv_bias')!r}")
  validate_moe_config(m)


def validate_moe_config(m) -> None:
  moe = m.get("moe")
  if not moe or int(moe.num_experts) == 0:
    return
  require(int(moe.num_experts) > 0, "model.moe.num_experts", f"must be >= 0, got {moe.num_experts}")
  require(1 <= int(moe.every) <= int(m.n_layers), "model.moe.every",
          f"must be in [1, model.n_layers={m.n_layers}], got {moe.every}")
  require(moe.routing in ROUTINGS, "model.moe.routing", f"must be one of {ROUTINGS}, got '{moe.routing}'")
  require(moe.mode in MODES, "model.moe.mode", f"must be one of {MODES}, got '{moe.mode}'")
  if moe.routing == "token_choice":
    require(1 <= int(moe.top_k) <= int(moe.num_experts), "model.moe.top_k",
            f"must be in [1, model.moe.num_experts={moe.num_experts}], got {moe.top_k}")
  require(moe.second_policy in SECOND_POLICIES, "model.moe.second_policy",
          f"must be one of {SECOND_POLICIES}, got '{moe.second_policy}'")
  require(float(moe.capacity_factor) > 0, "model.moe.capacity_factor", f"must be > 0, got {moe.capacity_factor}")
  require(int(moe.num_groups) >= 1, "model.moe.num_groups", f"must be >= 1, got {moe.num_groups}")
  require(int(moe.d_ff) >= 0, "model.moe.d_ff", f"must be >= 0 (0 = model.d_ff), got {moe.d_ff}")
  require(moe.get("grouped_impl", "auto") in GROUPED_IMPLS, "model.moe.grouped_impl",
          f"must be one of {GROUPED_IMPLS} (the dropless grouped matmul), got '{moe.get('grouped_impl')}'")
  require(float(moe.get("exchange_slack", 2.0)) > 0, "model.moe.exchange_slack",
          f"must be > 0, got {moe.get('exchange_slack')}")


def block_spec(m) -> BlockSpec:
  """The block hyperparameters of a dense-LM-shaped `model` section (also MoMa's and MoT's)."""
  return BlockSpec(d_model=int(m.d_model), n_heads=int(m.n_heads), n_kv_heads=int(m.n_kv_heads), d_ff=int(m.d_ff),
                   n_layers=int(m.n_layers), head_dim=int(m.head_dim), window=int(m.window),
                   norm_eps=float(m.norm_eps), rope_theta=float(m.rope_theta),
                   rope_scaling=tuple(sorted(dict(m.get("rope_scaling") or {}).items())),
                   qk_norm=bool(m.get("qk_norm", False)), qkv_bias=bool(m.get("qkv_bias", False)),
                   dtype=DTYPES[m.dtype])


def is_moe_layer(m, index: int) -> bool:
  """Whether block `index` (0-based) has an MoE FFN: the every-th, 2*every-th, ... block."""
  moe = m.get("moe")
  return bool(moe) and int(moe.num_experts) > 0 and (index + 1) % int(moe.every) == 0


def moe_settings(m) -> MoESettings:
  moe = m.moe
  return MoESettings(n_experts=int(moe.num_experts), top_k=int(moe.top_k), routing=moe.routing, mode=moe.mode,
                     capacity_factor=float(moe.capacity_factor), second_policy=moe.second_policy,
                     num_groups=int(moe.num_groups), router_noise=float(moe.router_noise),
                     balance_weight=float(moe.balance_weight), z_loss_weight=float(moe.z_loss_weight),
                     grouped_impl=moe.get("grouped_impl", "auto"),
                     exchange_slack=float(moe.get("exchange_slack", 2.0)),
                     eval_capacity_token_fraction=float(moe.get("eval_capacity_token_fraction", 0.0)))


def stack_blocks(blocks: Sequence[Block]) -> Block:
  """One Block whose parameters hold those of `blocks` stacked on a leading axis, named 'layers' in their
  logical axes (common.sharding.RULES replicates it), in the layout `jax.lax.scan` runs over."""
  graphdef, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *[nnx.state(block) for block in blocks])
  block = nnx.merge(graphdef, stacked)
  for _, var in nnx.iter_graph(block):
    if isinstance(var, nnx.Variable) and var.get_metadata().get("axes"):
      var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
  return block


def unrolled(model: "DenseLM") -> "DenseLM":
  """`model` with its blocks unrolled (model.scan_layers=False), each block's parameters a slice of the stacked
  ones: the layout KV-cached decoding, LoRA, the hub and the Hugging Face export read. Unchanged if already
  unrolled."""
  if not model.scan_layers:
    return model
  cfg = model.cfg.copy_and_resolve_references()
  cfg.scan_layers = False
  graphdef, state = nnx.split(nnx.eval_shape(lambda: DenseLM(cfg, rngs=nnx.Rngs(0))))
  scanned = nnx.to_pure_dict(nnx.state(model))
  layers = {i: jax.tree.map(lambda x, i=i: x[i], scanned["blocks"]) for i in range(int(cfg.n_layers))}
  nnx.replace_by_pure_dict(state, {**scanned, "blocks": layers})
  return nnx.merge(graphdef, state)


def _moe_ffn(m, *, rngs, dtype) -> MoE:
  return MoE(m.d_model, int(m.moe.d_ff) or m.d_ff, moe_settings(m), rngs=rngs, dtype=dtype,
             out_scale=1.0 / math.sqrt(2 * m.n_layers), expert_parallel=bool(m.moe.expert_parallel))


class DenseLM(nnx.Module):
  """tokens [batch, length] -> logits [batch, length, vocab] (f32)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    validate_model_config(cfg)
    self.cfg = cfg
    spec = block_spec(cfg)
    dtype = spec.dtype
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype)
    blocks = [Block(spec, rngs=rngs, ffn=_moe_ffn(cfg, rngs=rngs, dtype=dtype) if is_moe_layer(cfg, i) else None)
              for i in range(cfg.n_layers)]
    self.scan_layers = bool(cfg.get("scan_layers", False))
    # Scanned: the same initial weights as unrolled (same draws, same order), stacked.
    self.blocks = stack_blocks(blocks) if self.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.lm_head = None if cfg.tie_embeddings else Linear(
        cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=dtype)
    self.remat = remat_policy_name(cfg) != "none"
    self.remat_policy = REMAT_POLICIES[remat_policy_name(cfg)]
    param_dtype = DTYPES[cfg.get("param_dtype", "float32")]
    if param_dtype != jnp.float32:
      # Drawn in f32 as always, then stored rounded: the same model as the f32 one to bf16 precision.
      params = nnx.state(self, nnx.Param)
      nnx.update(self, jax.tree.map(lambda p: p.astype(param_dtype), params))

  def hidden(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
             key_bias: jax.Array | None = None) -> jax.Array:
    """Final normed hidden states [batch, length, d_model]; key_bias f32 [batch, length] or None."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    x = self.embed(tokens)
    if self.scan_layers:
      return self.final_norm(self._scan_blocks(x, positions, segment_ids, key_bias))
    for block in self.blocks:
      if self.remat:
        x = nnx.remat(lambda blk, h: blk(h, positions, segment_ids, key_bias), policy=self.remat_policy)(block, x)
      else:
        x = block(x, positions, segment_ids, key_bias)
    return self.final_norm(x)

  def _scan_blocks(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                   key_bias: jax.Array | None) -> jax.Array:
    """The stacked blocks as one scan step per layer; with remat the step is the checkpointed unit."""
    graphdef, stacked = nnx.split(self.blocks)

    def layer(h, layer_state):
      return nnx.merge(graphdef, layer_state)(h, positions, segment_ids, key_bias), None

    if self.remat:
      layer = jax.checkpoint(layer, policy=self.remat_policy)
    return jax.lax.scan(layer, x, stacked)[0]

  def logits(self, h: jax.Array) -> jax.Array:
    out = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
    return out.astype(jnp.float32)

  def __call__(self, tokens, positions=None, segment_ids=None, key_bias=None) -> jax.Array:
    return self.logits(self.hidden(tokens, positions, segment_ids, key_bias))

  def _require_unrolled(self) -> None:
    if self.scan_layers:
      raise ConfigError("config key 'model.scan_layers': KV-cached decoding runs the unrolled blocks; decode "
                        "common.models.dense_lm.unrolled(model) (what `common.hub publish` stores)")

  def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
    """Empty key/value caches for `decode`, one per block, for rows of up to `max_len` tokens (a windowed
    model keeps a ring buffer of `model.window` slots), in the compute dtype."""
    self._require_unrolled()
    return init_caches(self.blocks, batch, max_len, dtype=DTYPES[self.cfg.dtype])

  def decode(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, caches: list[KVCache],
             advance: jax.Array | None = None, *, last_only: bool = False,
             key_bias: jax.Array | None = None) -> tuple[jax.Array, list[KVCache]]:
    """The cached twin of `__call__`: logits [batch, new, vocab] (f32) of new tokens [batch, new] at absolute
    `positions` given what the caches hold (a prompt, then one token at a time), and the updated caches.
    `last_only`: logits of the last new token only ([batch, 1, vocab]), all a prompt's prefill needs.
    `key_bias` [batch, n]: the bias `__call__` would take, over each row's tokens (the row's i-th token, cached
    or new, takes key_bias[:, i]; pass the same array at every step)."""
    self._require_unrolled()
    x, caches = decode_blocks(self.blocks, self.embed(tokens), positions, segment_ids, caches, advance, key_bias)
    if last_only:
      x = x[:, -1:]
    return self.logits(self.final_norm(x)), caches


# Builders of the models papers define, by `model.name` (`register_model`): common imports no paper package, so a
# paper registers its model where it defines it (blt.model does), for the tools that build any model by name
# (common.plan).
_REGISTERED: dict[str, Callable[..., nnx.Module]] = {}


def register_model(name: str, build: Callable[..., nnx.Module]) -> None:
  """`build(model_cfg, seed=...)` -> the nnx model that `model.name` = `name` names."""
  _REGISTERED[name] = build


def build_model(model_cfg, *, seed: int) -> nnx.Module:
  """The model named by `model.name`: the dense LM, or one a paper registered (`register_model`)."""
  if model_cfg.name in _REGISTERED:
    return _REGISTERED[model_cfg.name](model_cfg, seed=seed)
  if model_cfg.name != "dense_lm":
    known = ", ".join(["dense_lm", *_REGISTERED])
    raise ConfigError(f"config key 'model.name': unknown model '{model_cfg.name}' (known: {known})")
  return DenseLM(model_cfg, rngs=nnx.Rngs(params=seed))
