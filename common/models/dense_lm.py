"""The Llama-3-style dense decoder LM: embeddings, N pre-norm blocks (GQA attention with RoPE, SwiGLU),
final RMSNorm, tied or untied output projection. The token baseline of the scaling papers and the base
model of the fine-tuning papers.

With `model.moe.num_experts > 0` every `model.moe.every`-th block (layers every-1, 2*every-1, ..., as fairseq's
`--moe-freq`; Artetxe et al. 2021 use every other layer) takes a mixture-of-experts FFN (`common.nn.moe.MoE`)
instead of the SwiGLU. Its auxiliary losses are sown into `nnx.Intermediate`; a loss function collects them
with `common.nn.moe.moe_loss_terms(model, weight)` after the forward pass."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import ConfigError, require
from common.nn import DTYPES, Block, BlockSpec, Embed, Linear, RMSNorm
from common.nn.kv_cache import KVCache, decode_blocks, init_caches
from common.nn.moe import MoE, MoESettings
from common.kernels.grouped_matmul.ops import IMPLS as GROUPED_IMPLS
from common.nn.moe.forward import MODES, ROUTINGS, SECOND_POLICIES

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
                     grouped_impl=moe.get("grouped_impl", "auto"))


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
    self.blocks = nnx.List([
        Block(spec, rngs=rngs, ffn=_moe_ffn(cfg, rngs=rngs, dtype=dtype) if is_moe_layer(cfg, i) else None)
        for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.lm_head = None if cfg.tie_embeddings else Linear(
        cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=dtype)
    self.remat = bool(cfg.get("remat", False))

  def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None) -> jax.Array:
    """Final normed hidden states [batch, length, d_model]."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    x = self.embed(tokens)
    for block in self.blocks:
      if self.remat:
        x = nnx.remat(lambda blk, h: blk(h, positions, segment_ids))(block, x)
      else:
        x = block(x, positions, segment_ids)
    return self.final_norm(x)

  def logits(self, h: jax.Array) -> jax.Array:
    out = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
    return out.astype(jnp.float32)

  def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
    return self.logits(self.hidden(tokens, positions, segment_ids))

  def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
    """Empty key/value caches for `decode`, one per block, for rows of up to `max_len` tokens (a windowed
    model keeps a ring buffer of `model.window` slots), in the compute dtype."""
    return init_caches(self.blocks, batch, max_len, dtype=DTYPES[self.cfg.dtype])

  def decode(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, caches: list[KVCache],
             advance: jax.Array | None = None, *, last_only: bool = False) -> tuple[jax.Array, list[KVCache]]:
    """The cached twin of `__call__`: logits [batch, new, vocab] (f32) of new tokens [batch, new] at absolute
    `positions` given what the caches hold (a prompt, then one token at a time), and the updated caches.
    `last_only`: logits of the last new token only ([batch, 1, vocab]), all a prompt's prefill needs."""
    x, caches = decode_blocks(self.blocks, self.embed(tokens), positions, segment_ids, caches, advance)
    if last_only:
      x = x[:, -1:]
    return self.logits(self.final_norm(x)), caches


def build_model(model_cfg, *, seed: int) -> nnx.Module:
  """The model named by `model.name` (papers register their own builders in their train.py)."""
  if model_cfg.name != "dense_lm":
    raise ConfigError(f"config key 'model.name': unknown model '{model_cfg.name}' (known: dense_lm)")
  return DenseLM(model_cfg, rngs=nnx.Rngs(params=seed))
