"""The Byte Latent Transformer (Pagnoni et al. 2024, Sec. 3, Fig. 2): a small byte-level LocalEncoder turns
the bytes of each patch into a patch representation, a large GlobalTransformer runs causally over patches,
and a small LocalDecoder turns the global output back into next-byte logits.

Causality (Sec. 3): the logits at byte t depend only on bytes <= t, given patch boundaries that are
themselves causal (`blt.patcher`). The encoder's self-attention is causal, its patch queries see only their
own patch, the global model is causal over patches, and the decoder groups bytes by `model.decoder_grouping`:
- 'official' (the default, as the official code's decoder patch ids, the encoder's shifted by one byte): byte
  t reads the global outputs of the patches before the patch of byte t+1. The last byte of patch j, whose
  next byte opens patch j+1, thus reads patch j itself (its global state has seen bytes <= t), so the byte
  that opens a patch, under entropy patching the hard one, is predicted with the patch that just ended.
  The patchers decide whether byte t+1 opens a patch from bytes <= t, which keeps this causal;
- 'lagged' (the ablation): a byte in patch j reads patches k < j only, so the first byte of every patch is
  predicted without the patch just before it.

Documents packed into one row stay apart at the patch level too: a patch belongs to the document of its first
byte (`patch_documents`; the patchers open a patch at every document start), the global model attends only to
patches of the same document, with patch positions restarting at each document, and a byte's decoder
cross-attention reads only earlier patches of its own document. A packed row thus gives each document the
logits it would get alone.

The architecture switches the paper ablates (`Ablations`; each default is the model as first built here, so
configs and run dirs written before a key existed read it unchanged):
- `cross_attn_k`: query slots per patch (Sec. 3.2.2; the official code's `cross_attn_k`). The pooled patch
  vector is projected to k d_local-wide slots that each cross-attend to the patch's bytes and together, k
  d_local wide, are projected to d_global; the decoder projects each global output back to k d_local-wide
  keys/values. With k = 1 neither extra projection exists: the queries are the pooled states, and the decoder
  reads the d_global outputs directly (the official d_global -> d_local projection folded into wk, wv);
- `encoder_cross`: one cross-attention after the last encoder layer ('last'), one after every layer ('every',
  the official `cross_attn_all_layers_encoder`: the queries are pooled after the first layer and refined by
  each layer's byte states), or none ('none': the patch is its max-pooled byte states);
- `decoder_cross`: cross-attention before every decoder layer ('every', the official
  `cross_attn_all_layers_decoder`), or only before the first or the last;
- `hash_functions`: hash functions per n-gram size, each with its own tables (`blt.hash_embed`); 0 = no hash
  embeddings;
- `decoder_patch_scope`: a byte reads every earlier readable patch of its document ('all'), or only the one
  its grouping points at ('own', the official decoder mask without a window: the last readable patch, and
  the paper's FLOP count with m = k).

Each module also has an incremental form (`decode`, `decode_byte`) over `common.nn.kv_cache` caches, which
`blt.generate` drives byte by byte.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from blt.hash_embed import HASH_BASES, HashNGramEmbed
from common.config import ConfigError, require
from common.models import register_model
from common.nn import DTYPES, Block, BlockSpec, Embed, Linear, RMSNorm, dot_product_attention
from common.nn.kv_cache import KVCache, decode_blocks

VOCAB_SIZE = 260  # 256 byte values + BOS, EOS, PAD, BOE


def blt_model(**overrides) -> ml_collections.ConfigDict:
  """Model section of a BLT; the sizes are a laptop-scale default (the paper's are in its Table 10)."""
  m = ml_collections.ConfigDict(dict(
      name="blt", vocab_size=VOCAB_SIZE, d_local=64, n_heads_local=4, local_window=64, d_ff_local=0,
      n_layers_encoder=1, n_layers_decoder=2, n_heads_cross=4,
      d_global=128, n_layers_global=2, n_heads_global=4, d_ff_global=0,
      hash_n_min=3, hash_n_max=8, hash_table_size=4096, norm_eps=1e-5, rope_theta=10000.0,
      decoder_grouping="official",  # 'official' or 'lagged' (module docstring)
      cross_attn_k=1, encoder_cross="last", decoder_cross="every", hash_functions=1,
      decoder_patch_scope="all",  # the ablation switches (`Ablations`)
      dtype="float32"))  # compute dtype (common.nn.DTYPES); parameters stay f32
  m.update(overrides)
  return m


DECODER_GROUPINGS = ("official", "lagged")
ENCODER_CROSS = ("last", "every", "none")
DECODER_CROSS = ("every", "first", "last")
PATCH_SCOPES = ("all", "own")


class Ablations(NamedTuple):
  """The architecture switches of the module docstring; the defaults are the model before they existed."""
  cross_attn_k: int = 1
  encoder_cross: str = "last"
  decoder_cross: str = "every"
  hash_functions: int = 1
  decoder_patch_scope: str = "all"

  @classmethod
  def from_config(cls, m) -> Ablations:
    """The switches of `model` m (a missing key: its default), each checked (ConfigError naming the key)."""
    values = {}
    for key, default in cls._field_defaults.items():
      try:
        values[key] = type(default)(m.get(key, default))
      except (TypeError, ValueError):
        raise ConfigError(f"config key 'model.{key}': must be {type(default).__name__}, got {m.get(key)!r}") from None
    a = cls(**values)
    require(a.cross_attn_k >= 1, "model.cross_attn_k", f"must be >= 1 (query slots per patch), got {a.cross_attn_k}")
    require(a.encoder_cross in ENCODER_CROSS, "model.encoder_cross",
            f"must be one of {', '.join(ENCODER_CROSS)}, got '{a.encoder_cross}'")
    require(a.decoder_cross in DECODER_CROSS, "model.decoder_cross",
            f"must be one of {', '.join(DECODER_CROSS)}, got '{a.decoder_cross}'"
            + (" (the decoder's cross-attention is the only path from the global model to the logits)"
               if a.decoder_cross == "none" else ""))
    require(0 <= a.hash_functions <= len(HASH_BASES), "model.hash_functions",
            f"must be in 0..{len(HASH_BASES)} (0 = no hash embeddings; one base each), got {a.hash_functions}")
    require(1 <= int(m.hash_n_min) <= int(m.hash_n_max), "model.hash_n_min",
            f"need 1 <= hash_n_min <= hash_n_max, got {m.hash_n_min} and {m.hash_n_max}")
    require(a.decoder_patch_scope in PATCH_SCOPES, "model.decoder_patch_scope",
            f"must be one of {', '.join(PATCH_SCOPES)}, got '{a.decoder_patch_scope}'")
    return a


def compute_dtype(m):
  """The compute dtype of `model.dtype` (configs written before the key existed: f32)."""
  return DTYPES[m.get("dtype", "float32")]


def decoder_grouping(m) -> str:
  """`model.decoder_grouping`; runs configured before the key existed decoded 'lagged'."""
  return m.get("decoder_grouping", "lagged")


def _block_spec(d_model, n_heads, n_layers, d_ff, window, m) -> BlockSpec:
  """A stack's block: multi-head attention (as many key/value heads as query heads), SwiGLU of d_ff (0 =
  4 d_model)."""
  return BlockSpec(d_model=int(d_model), n_heads=int(n_heads), n_kv_heads=int(n_heads), d_ff=int(d_ff) or 4 * int(d_model),
                   n_layers=int(n_layers), window=int(window), norm_eps=float(m.norm_eps),
                   rope_theta=float(m.rope_theta), dtype=compute_dtype(m))


def patch_documents(patch_ids: jax.Array, segment_ids: jax.Array, max_patches: int) -> tuple[jax.Array, jax.Array]:
  """(patch_segment_ids, patch_positions), int32 [batch, max_patches]: the segment id of each patch's first
  byte (0 for empty patch slots), and each patch's index within its document. Both depend only on bytes up
  to the patch's first one, so they keep the model causal."""
  batch = patch_ids.shape[0]
  first = jnp.concatenate([jnp.ones((batch, 1), bool), patch_ids[:, 1:] != patch_ids[:, :-1]], axis=1)
  slot = jnp.where(first, patch_ids, max_patches)  # out of range: dropped
  rows = jnp.arange(batch)[:, None]
  patch_segs = jnp.zeros((batch, max_patches), jnp.int32).at[rows, slot].set(segment_ids.astype(jnp.int32),
                                                                              mode="drop")
  index = jnp.arange(max_patches)
  new_doc = jnp.concatenate([jnp.ones((batch, 1), bool), patch_segs[:, 1:] != patch_segs[:, :-1]], axis=1)
  doc_start = jax.lax.cummax(jnp.where(new_doc, index, 0), axis=1)
  return patch_segs, index - doc_start


def _own_keys_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_owner: jax.Array) -> jax.Array:
  """softmax attention where query p sees exactly the keys t with key_owner[t] == p (owners >= q_len: no
  query), as a segment softmax over keys: each key is scored against its owner only, normalised within its
  owner's keys, and the weighted values are summed per owner. q [batch, q_len, heads, head_dim]; k, v
  [batch, kv_len, heads, head_dim]; a query that owns no key returns 0. Equal to `dot_product_attention`
  with the mask key_owner[t] == p, without its [q_len, kv_len] scores (for patches of 4 bytes in rows of
  2048, 1/512 of them)."""
  q_len = q.shape[1]
  owner = key_owner[:, :, None, None]
  q_of_key = jnp.take_along_axis(q, owner, axis=1, mode="fill", fill_value=0)  # [batch, kv_len, heads, hd]
  scores = jnp.sum((q_of_key * k).astype(jnp.float32), axis=-1) / math.sqrt(q.shape[-1])  # [batch, kv_len, heads]
  per_query = lambda op: jax.vmap(functools.partial(op, num_segments=q_len))
  # The max only keeps exp() in range; softmax does not depend on it, so no gradient flows through it.
  top = jax.lax.stop_gradient(per_query(jax.ops.segment_max)(scores, key_owner))  # [batch, q_len, heads]
  weights = jnp.exp(scores - jnp.take_along_axis(top, key_owner[:, :, None], axis=1, mode="fill", fill_value=0))
  total = per_query(jax.ops.segment_sum)(weights, key_owner)  # [batch, q_len, heads]
  summed = per_query(jax.ops.segment_sum)(weights[..., None] * v.astype(jnp.float32), key_owner)
  out = jnp.where(total[..., None] > 0, summed / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
  return out.astype(v.dtype)


class CrossAttention(nnx.Module):
  """Pre-norm multi-head cross-attention, queries [batch, q_len, d_q] over keys/values [batch, kv_len, d_kv]
  (no RoPE, Sec. 3.2.2); rows whose mask is empty return 0, so the residual passes through unchanged."""

  def __init__(self, d_q: int, d_kv: int, n_heads: int, *, rngs: nnx.Rngs, eps: float = 1e-5, dtype=jnp.float32):
    head_dim = d_q // n_heads
    self.q_norm, self.kv_norm = RMSNorm(d_q, eps=eps, dtype=dtype), RMSNorm(d_kv, eps=eps, dtype=dtype)
    self.wq = Linear(d_q, (n_heads, head_dim), axes=("embed", "heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.wk = Linear(d_kv, (n_heads, head_dim), axes=("embed", "heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.wv = Linear(d_kv, (n_heads, head_dim), axes=("embed", "heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.wo = Linear(n_heads * head_dim, d_q, axes=("heads", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, queries: jax.Array, keys_values: jax.Array, mask: jax.Array | None = None, *,
               key_owner: jax.Array | None = None) -> jax.Array:
    """`mask` (bool [batch, 1, q_len, kv_len]) says which keys each query sees. Where every key belongs to
    exactly one query (the encoder's patch queries over their own bytes), `key_owner` (int [batch, kv_len],
    the query of each key) replaces it: the same attention in O(kv_len) instead of O(q_len * kv_len). With
    `key_owner`, queries may be [batch, q_len, slots, d_q]: several query slots that read the same keys."""
    kv = self.kv_norm(keys_values)
    q, k, v = self.wq(self.q_norm(queries)), self.wk(kv), self.wv(kv)
    if key_owner is not None:
      # The slots of a query (`model.cross_attn_k`) become extra heads over the keys repeated per slot.
      slots = q.shape[2] if q.ndim == 5 else 1
      tiled = lambda x: jnp.tile(x, (1, 1, slots, 1))
      out = _own_keys_attention(q.reshape(*q.shape[:2], -1, q.shape[-1]), tiled(k), tiled(v), key_owner)
      out = out.reshape(*queries.shape[:-1], -1)
    else:
      out = dot_product_attention(q, k, v, mask)
      out = jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0.0)
      out = out.reshape(*out.shape[:2], -1)
    return self.wo(out)


class LocalEncoder(nnx.Module):
  """Bytes -> (byte states h [batch, length, d_local], patch representations [batch, max_patches, d_global]).

  Byte embedding plus hash n-gram embeddings (Sec. 3.2.1), windowed causal self-attention layers, then
  cross-attention (Sec. 3.2.2) where each patch query, initialised by max-pooling its bytes' states,
  attends only to the bytes of its own patch (`model.encoder_cross`, `model.cross_attn_k`: module docstring)."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    a = Ablations.from_config(m)
    dtype = compute_dtype(m)
    n_layers = int(m.n_layers_encoder)
    self.embed = Embed(m.vocab_size, m.d_local, rngs=rngs, dtype=dtype)
    self.hash_embed = HashNGramEmbed(m.d_local, n_min=m.hash_n_min, n_max=m.hash_n_max, table_size=m.hash_table_size,
                                     n_functions=a.hash_functions, rngs=rngs, dtype=dtype)
    spec = _block_spec(m.d_local, m.n_heads_local, m.n_layers_encoder, m.d_ff_local, m.local_window, m)
    self.layers = nnx.List([Block(spec, rngs=rngs) for _ in range(n_layers)])
    cross = lambda: CrossAttention(m.d_local, m.d_local, m.n_heads_cross, rngs=rngs, eps=m.norm_eps, dtype=dtype)
    self.cross = None if a.encoder_cross == "none" else cross()  # after the last layer
    self.slots = 1 if a.encoder_cross == "none" else a.cross_attn_k  # pooling alone has no query slots
    self.to_global = Linear(self.slots * m.d_local, m.d_global, axes=("embed", None), rngs=rngs, dtype=dtype)
    self.early_cross = nnx.List([cross() for _ in range(n_layers - 1)] if a.encoder_cross == "every" else [])
    self.to_slots = (Linear(m.d_local, self.slots * m.d_local, axes=("embed", None), rngs=rngs, dtype=dtype)
                     if self.slots > 1 else None)
    # The layers whose byte states the patch step reads: pooling takes the first, cross-attention i the i-th.
    self.read_layers = tuple(range(n_layers)) if a.encoder_cross == "every" else (n_layers - 1,)

  def __call__(self, byte_ids, patch_ids, max_patches: int, positions, segment_ids):
    h = self.embed(byte_ids) + self.hash_embed(byte_ids, segment_ids)
    states = []
    for i, layer in enumerate(self.layers):
      h = layer(h, positions, segment_ids)
      if i in self.read_layers:
        states.append(h)
    return h, self.patches(states, patch_ids, max_patches)

  def patches(self, states: list[jax.Array], key_owner: jax.Array, n_patches: int) -> jax.Array:
    """Patch representations [batch, n_patches, d_global] from the byte states [batch, length, d_local] of
    the `read_layers`; key_owner (int [batch, length]) is the patch of each byte (>= n_patches: none)."""
    per_patch = lambda op: jax.vmap(functools.partial(op, num_segments=n_patches))
    filled = per_patch(jax.ops.segment_sum)(jnp.ones_like(key_owner), key_owner) > 0  # [batch, patches]
    x = jnp.where(filled[..., None], per_patch(jax.ops.segment_max)(states[0], key_owner), 0.0)  # 0: empty slots
    if self.to_slots is not None:
      x = self.to_slots(x).reshape(*x.shape[:2], self.slots, -1)  # [batch, patches, k, d_local]
    crosses = [*self.early_cross, self.cross] if self.cross is not None else []
    for cross, h in zip(crosses, states):
      x = x + cross(x, h, key_owner=key_owner)
    return self.to_global(x.reshape(*x.shape[:2], -1))

  def decode_byte(self, byte_context: jax.Array, context_segment_ids: jax.Array, position: jax.Array,
                  caches: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
    """Byte states [batch, 1, len(read_layers), d_local] of one new byte (the last entry: its final state):
    `byte_context` [batch, hash_n_max] holds the ids ending at the new byte (its hash n-grams), with
    `context_segment_ids` 0 before the start of the text and 1 after; `position` [batch, 1]."""
    new = byte_context[:, -1:]
    h = self.embed(new) + self.hash_embed(byte_context, context_segment_ids)[:, -1:]
    states, out = [], []
    for i, (layer, cache) in enumerate(zip(self.layers, caches)):
      h, [cache] = decode_blocks([layer], h, position, jnp.ones_like(new), [cache])
      out.append(cache)
      if i in self.read_layers:
        states.append(h)
    return jnp.stack(states, axis=2), out


class GlobalTransformer(nnx.Module):
  """Causal transformer over patch representations [batch, max_patches, d_global] (Sec. 3.1)."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    spec = _block_spec(m.d_global, m.n_heads_global, m.n_layers_global, m.d_ff_global, 0, m)
    self.layers = nnx.List([Block(spec, rngs=rngs) for _ in range(m.n_layers_global)])
    self.norm = RMSNorm(m.d_global, eps=m.norm_eps, dtype=spec.dtype)

  def __call__(self, patches: jax.Array, patch_segment_ids: jax.Array | None = None,
               patch_positions: jax.Array | None = None) -> jax.Array:
    b, n = patches.shape[:2]
    if patch_positions is None:
      patch_positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    if patch_segment_ids is None:
      patch_segment_ids = jnp.ones((b, n), jnp.int32)
    for layer in self.layers:
      patches = layer(patches, patch_positions, patch_segment_ids)
    return self.norm(patches)

  def decode(self, patches: jax.Array, patch_positions: jax.Array, caches: list[KVCache],
             advance: jax.Array) -> tuple[jax.Array, list[KVCache]]:
    """One new patch per row [batch, 1, d_global] at `patch_positions` [batch, 1]; only the rows where
    `advance` (bool [batch]) take the step into their caches."""
    x, caches = decode_blocks(self.layers, patches, patch_positions, jnp.ones_like(patch_positions), caches,
                              advance)
    return self.norm(x), caches


class LocalDecoder(nnx.Module):
  """(byte states, global patch outputs) -> next-byte logits [batch, length, vocab] (Sec. 3.3): the layers of
  `model.decoder_cross` first cross-attend from bytes to the global outputs of the patches that `readable`
  (per byte; the grouping of the module docstring) and `model.decoder_patch_scope` allow, as k key/value
  slots each (`model.cross_attn_k`), then every layer applies a windowed causal self-attention block."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    a = Ablations.from_config(m)
    n_layers = int(m.n_layers_decoder)
    spec = _block_spec(m.d_local, m.n_heads_local, m.n_layers_decoder, m.d_ff_local, m.local_window, m)
    self.cross_layers = dict(every=tuple(range(n_layers)), first=(0,), last=(n_layers - 1,))[a.decoder_cross]
    self.slots, self.scope = a.cross_attn_k, a.decoder_patch_scope
    self.d_kv = m.d_global if self.slots == 1 else m.d_local  # the width of a key/value slot
    self.cross = nnx.List([CrossAttention(m.d_local, self.d_kv, m.n_heads_cross, rngs=rngs, eps=m.norm_eps,
                                          dtype=spec.dtype) for _ in self.cross_layers])
    self.layers = nnx.List([Block(spec, rngs=rngs) for _ in range(n_layers)])
    self.norm = RMSNorm(m.d_local, eps=m.norm_eps, dtype=spec.dtype)
    self.lm_head = Linear(m.d_local, m.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=spec.dtype)
    self.from_global = (Linear(m.d_global, self.slots * m.d_local, axes=("embed", None), rngs=rngs, dtype=spec.dtype)
                        if self.slots > 1 else None)

  def patch_slots(self, global_out: jax.Array) -> jax.Array:
    """[batch, patches * k, d_kv]: the k key/value slots of each global output [batch, patches, d_global]."""
    if self.from_global is None:
      return global_out
    return self.from_global(global_out).reshape(global_out.shape[0], -1, self.d_kv)

  def readable_patches(self, readable: jax.Array, n_patches: int) -> jax.Array:
    """bool [..., n_patches]: the patches a byte reads, from its `readable` [...] (the patches before it):
    all of them, or under the 'own' scope only the last."""
    index = jnp.arange(n_patches)
    if self.scope == "own":
      return index == readable[..., None] - 1
    return index < readable[..., None]

  def __call__(self, h, global_out, readable, positions, segment_ids, patch_segment_ids=None):
    visible = self.readable_patches(readable, global_out.shape[1])  # [batch, length, patches]
    if patch_segment_ids is not None:
      visible &= patch_segment_ids[:, None, :] == segment_ids[:, :, None]
    visible = jnp.repeat(visible, self.slots, axis=-1)  # [batch, length, patches * k]
    memory, crosses = self.patch_slots(global_out), dict(zip(self.cross_layers, self.cross))
    for i, layer in enumerate(self.layers):
      if i in crosses:
        h = h + crosses[i](h, memory, visible[:, None])
      h = layer(h, positions, segment_ids)
    return self.lm_head(self.norm(h)).astype(jnp.float32)

  def decode_byte(self, h: jax.Array, memory: jax.Array, readable: jax.Array, position: jax.Array,
                  caches: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
    """Next-byte logits [batch, 1, vocab] of one new byte (states h [batch, 1, d_local] at `position`
    [batch, 1]) that reads the patch slots `memory` [batch, patches * k, d_kv] (`patch_slots`) of the patches
    `readable` [batch] allows."""
    segment_ids = jnp.ones(position.shape, jnp.int32)
    visible = jnp.repeat(self.readable_patches(readable, memory.shape[1] // self.slots), self.slots, axis=-1)
    crosses, out = dict(zip(self.cross_layers, self.cross)), []
    for i, (layer, cache) in enumerate(zip(self.layers, caches)):
      if i in crosses:
        h = h + crosses[i](h, memory, visible[:, None, None, :])
      h, cache = layer.decode(h, position, segment_ids, cache)
      out.append(cache)
    return self.lm_head(self.norm(h)).astype(jnp.float32), out


class BLT(nnx.Module):
  """byte_ids [batch, length] and patch_ids, next_patch_ids [batch, length] (from `blt.patcher`) -> logits
  [batch, length, vocab]; logits[:, t] predict byte t+1. `max_patches` is static; `next_patch_ids` is needed
  by the 'official' decoder grouping only."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    if decoder_grouping(m) not in DECODER_GROUPINGS:
      raise ValueError(f"model.decoder_grouping: must be one of {DECODER_GROUPINGS}, got '{decoder_grouping(m)}'")
    Ablations.from_config(m)  # bad switches fail here, naming their key
    self.grouping = decoder_grouping(m)
    self.local_encoder = LocalEncoder(m, rngs=rngs)
    self.global_transformer = GlobalTransformer(m, rngs=rngs)
    self.local_decoder = LocalDecoder(m, rngs=rngs)

  def __call__(self, byte_ids, patch_ids, max_patches: int, positions=None, segment_ids=None,
               next_patch_ids=None):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(byte_ids.shape[1]), byte_ids.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(byte_ids)
    if self.grouping == "official" and next_patch_ids is None:
      raise ValueError("the 'official' decoder grouping needs next_patch_ids (blt.patcher.patch gives them)")
    h, patches = self.local_encoder(byte_ids, patch_ids, max_patches, positions, segment_ids)
    patch_segment_ids, patch_positions = patch_documents(patch_ids, segment_ids, max_patches)
    global_out = self.global_transformer(patches, patch_segment_ids, patch_positions)
    readable = next_patch_ids if self.grouping == "official" else patch_ids
    return self.local_decoder(h, global_out, readable, positions, segment_ids, patch_segment_ids)


register_model("blt", lambda model_cfg, *, seed: BLT(model_cfg, rngs=nnx.Rngs(params=seed)))
