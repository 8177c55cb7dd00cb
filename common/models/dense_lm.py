"""The Llama-3-style dense decoder LM: embeddings, N pre-norm blocks (GQA attention with RoPE, SwiGLU),
final RMSNorm, tied or untied output projection. The token baseline of the scaling papers and the base
model of the fine-tuning papers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import ConfigError, require
from common.nn import Block, Embed, Linear, RMSNorm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


class DenseLM(nnx.Module):
  """tokens [batch, length] -> logits [batch, length, vocab] (f32)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    validate_model_config(cfg)
    self.cfg = cfg
    dtype = DTYPES[cfg.dtype]
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([Block(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.n_layers)])
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


def build_model(model_cfg, *, seed: int) -> nnx.Module:
  """The model named by `model.name` (papers register their own builders in their train.py)."""
  if model_cfg.name != "dense_lm":
    raise ConfigError(f"config key 'model.name': unknown model '{model_cfg.name}' (known: dense_lm)")
  return DenseLM(model_cfg, rngs=nnx.Rngs(params=seed))
