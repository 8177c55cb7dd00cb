"""The Byte Latent Transformer (Pagnoni et al. 2024, Sec. 3, Fig. 2): a small byte-level LocalEncoder turns
the bytes of each patch into a patch representation, a large GlobalTransformer runs causally over patches,
and a small LocalDecoder turns the global output back into next-byte logits.

Causality (Sec. 3): the logits at byte t depend only on bytes <= t, given patch boundaries that are
themselves causal (`blt.patcher`). The encoder's self-attention is causal, its patch queries see only their
own patch, the global model is causal over patches, and a byte in patch j reads the global output of patches
k < j only: patch j-1's global state (which has seen every byte before patch j) predicts patch j's bytes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from blt.hash_embed import HashNGramEmbed
from common.configs.base import dense_model
from common.nn import Block, Embed, Linear, RMSNorm, dot_product_attention

VOCAB_SIZE = 260  # 256 byte values + BOS, EOS, PAD, BOE


def blt_model(**overrides) -> ml_collections.ConfigDict:
  """Model section of a BLT; the sizes are a laptop-scale default (the paper's are in its Table 10)."""
  m = ml_collections.ConfigDict(dict(
      name="blt", vocab_size=VOCAB_SIZE, d_local=64, n_heads_local=4, local_window=64, d_ff_local=0,
      n_layers_encoder=1, n_layers_decoder=2, n_heads_cross=4,
      d_global=128, n_layers_global=2, n_heads_global=4, d_ff_global=0,
      hash_n_min=3, hash_n_max=8, hash_table_size=4096, norm_eps=1e-5, rope_theta=10000.0))
  m.update(overrides)
  return m


def _block_cfg(d_model, n_heads, n_layers, d_ff, window, m):
  return dense_model(d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, n_layers=n_layers,
                     d_ff=d_ff or 4 * d_model, window=window, norm_eps=m.norm_eps, rope_theta=m.rope_theta)


class CrossAttention(nnx.Module):
  """Pre-norm multi-head cross-attention, queries [batch, q_len, d_q] over keys/values [batch, kv_len, d_kv]
  (no RoPE, Sec. 3.2.2); rows whose mask is empty return 0, so the residual passes through unchanged."""

  def __init__(self, d_q: int, d_kv: int, n_heads: int, *, rngs: nnx.Rngs, eps: float = 1e-5):
    head_dim = d_q // n_heads
    self.q_norm, self.kv_norm = RMSNorm(d_q, eps=eps), RMSNorm(d_kv, eps=eps)
    self.wq = Linear(d_q, (n_heads, head_dim), axes=("embed", "heads", "head_dim"), rngs=rngs)
    self.wk = Linear(d_kv, (n_heads, head_dim), axes=("embed", "heads", "head_dim"), rngs=rngs)
    self.wv = Linear(d_kv, (n_heads, head_dim), axes=("embed", "heads", "head_dim"), rngs=rngs)
    self.wo = Linear(n_heads * head_dim, d_q, axes=("heads", "embed"), rngs=rngs)

  def __call__(self, queries: jax.Array, keys_values: jax.Array, mask: jax.Array) -> jax.Array:
    kv = self.kv_norm(keys_values)
    out = dot_product_attention(self.wq(self.q_norm(queries)), self.wk(kv), self.wv(kv), mask)
    out = jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0.0)
    return self.wo(out.reshape(*out.shape[:2], -1))


class LocalEncoder(nnx.Module):
  """Bytes -> (byte states h [batch, length, d_local], patch representations [batch, max_patches, d_global]).

  Byte embedding plus hash n-gram embeddings (Sec. 3.2.1), windowed causal self-attention layers, then
  cross-attention (Sec. 3.2.2) where each patch query, initialised by max-pooling its bytes' states,
  attends only to the bytes of its own patch."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    self.embed = Embed(m.vocab_size, m.d_local, rngs=rngs)
    self.hash_embed = HashNGramEmbed(m.d_local, n_min=m.hash_n_min, n_max=m.hash_n_max,
                                     table_size=m.hash_table_size, rngs=rngs)
    cfg = _block_cfg(m.d_local, m.n_heads_local, m.n_layers_encoder, m.d_ff_local, m.local_window, m)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(m.n_layers_encoder)])
    self.cross = CrossAttention(m.d_local, m.d_local, m.n_heads_cross, rngs=rngs, eps=m.norm_eps)
    self.to_global = Linear(m.d_local, m.d_global, axes=("embed", None), rngs=rngs)

  def __call__(self, byte_ids, patch_ids, max_patches: int, positions, segment_ids):
    h = self.embed(byte_ids) + self.hash_embed(byte_ids, segment_ids)
    for layer in self.layers:
      h = layer(h, positions, segment_ids)
    in_patch = patch_ids[:, None, :] == jnp.arange(max_patches)[None, :, None]  # [batch, patches, length]
    pool = jax.vmap(lambda x, ids: jax.ops.segment_max(x, ids, num_segments=max_patches))
    pooled = jnp.where(in_patch.any(-1)[..., None], pool(h, patch_ids), 0.0)  # 0 for empty patch slots
    patches = pooled + self.cross(pooled, h, in_patch[:, None])
    return h, self.to_global(patches)


class GlobalTransformer(nnx.Module):
  """Causal transformer over patch representations [batch, max_patches, d_global] (Sec. 3.1)."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    cfg = _block_cfg(m.d_global, m.n_heads_global, m.n_layers_global, m.d_ff_global, 0, m)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(m.n_layers_global)])
    self.norm = RMSNorm(m.d_global, eps=m.norm_eps)

  def __call__(self, patches: jax.Array) -> jax.Array:
    b, n = patches.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    segment_ids = jnp.ones((b, n), jnp.int32)
    for layer in self.layers:
      patches = layer(patches, positions, segment_ids)
    return self.norm(patches)


class LocalDecoder(nnx.Module):
  """(byte states, global patch outputs) -> next-byte logits [batch, length, vocab] (Sec. 3.3): each layer
  cross-attends from bytes to the global outputs of the patches before the byte's own, then applies a
  windowed causal self-attention block."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    cfg = _block_cfg(m.d_local, m.n_heads_local, m.n_layers_decoder, m.d_ff_local, m.local_window, m)
    self.cross = nnx.List([CrossAttention(m.d_local, m.d_global, m.n_heads_cross, rngs=rngs, eps=m.norm_eps)
                           for _ in range(m.n_layers_decoder)])
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(m.n_layers_decoder)])
    self.norm = RMSNorm(m.d_local, eps=m.norm_eps)
    self.lm_head = Linear(m.d_local, m.vocab_size, axes=("embed", "vocab"), rngs=rngs)

  def __call__(self, h, global_out, patch_ids, positions, segment_ids):
    max_patches = global_out.shape[1]
    earlier = jnp.arange(max_patches)[None, None, :] < patch_ids[:, :, None]  # [batch, length, patches]
    for cross, layer in zip(self.cross, self.layers):
      h = h + cross(h, global_out, earlier[:, None])
      h = layer(h, positions, segment_ids)
    return self.lm_head(self.norm(h)).astype(jnp.float32)


class BLT(nnx.Module):
  """byte_ids [batch, length] and patch_ids [batch, length] (from `blt.patcher`) -> logits
  [batch, length, vocab]; logits[:, t] predict byte t+1. `max_patches` is static."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    self.local_encoder = LocalEncoder(m, rngs=rngs)
    self.global_transformer = GlobalTransformer(m, rngs=rngs)
    self.local_decoder = LocalDecoder(m, rngs=rngs)

  def __call__(self, byte_ids, patch_ids, max_patches: int, positions=None, segment_ids=None):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(byte_ids.shape[1]), byte_ids.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(byte_ids)
    h, patches = self.local_encoder(byte_ids, patch_ids, max_patches, positions, segment_ids)
    global_out = self.global_transformer(patches)
    return self.local_decoder(h, global_out, patch_ids, positions, segment_ids)
