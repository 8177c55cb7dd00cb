"""Mixture-of-Transformers (Liang et al. 2024, arXiv 2411.04996): a transformer whose non-embedding weights
are untied per modality, over one global self-attention.

Sec. 2.2 / Algorithm 1 of the paper: for every layer and modality m, its own query, key, value and output
projections, QK-norm scales, the two RMSNorms and the SwiGLU FFN; the tokens of each modality go through
their modality's weights only, then one causal self-attention runs over the whole mixed sequence. Embeddings,
the final norm and the output projection are shared (as in `common.models.dense_lm`). Each token uses one
modality's weights, so a MoT layer costs the FLOPs of a dense layer of the same shape.

Norm placement (`model.norm_placement`): 'post' is the reference's (Algorithm 1 of the paper, Chameleon's
norm reordering, Chameleon Team 2024 arXiv 2405.09818 sec. 2.3): h = x + norm_m(attn(x)), out = h +
norm_m(ffn(h)), nothing normalises the sublayer inputs; 'pre' (Llama's, h = x + attn(norm_m(x))) is what a
config without the key means, and with one weight group it is exactly `common.models.DenseLM`.

Implementation: the residual stream lives in modality-sorted rows (`common.nn.modality_routing`), sorted
once per forward pass; each block's untied products are grouped matmuls on those rows (q, k and v fused into
one, gate and up into one), and only the attention moves rows back to sequence order (q, k, v out, its output
back in). With one modality group (`model.untied=False`, or one modality) there is no sorting and every
product is the dense one: the dense baseline of the same code.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import require
from common.kernels.grouped_matmul.ops import IMPLS as GROUPED_IMPLS
from common.models.dense_lm import REMAT_POLICIES, DenseLM, block_spec, remat_policy_name, validate_model_config
from common.nn import DTYPES, BlockSpec, Embed, Linear, RMSNorm
from common.nn.attention import blockwise_causal_attention, dot_product_attention
from common.nn.modality_routing import (ModalityGroups, ModalityLinear, ModalityRMSNorm, from_groups,
                                        group_by_modality, grouped_linear, to_groups)
from common.nn.rope import apply_rope, rope_frequencies

SETTINGS = ("chameleon", "transfusion")
NORM_PLACEMENTS = ("pre", "post")


def n_weight_groups(m) -> int:
  """Modality weight sets of a config: `model.n_modalities` when untied, 1 for the dense baseline."""
  return int(m.n_modalities) if bool(m.untied) else 1


def validate_mot_config(m) -> None:
  """Checks model.* of the MoT models once, naming the offending key."""
  validate_model_config(m)
  require(int(m.n_modalities) >= 1, "model.n_modalities", f"must be >= 1, got {m.n_modalities}")
  require(m.setting in SETTINGS, "model.setting", f"must be one of {SETTINGS}, got '{m.setting}'")
  require(m.grouped_impl in GROUPED_IMPLS, "model.grouped_impl",
          f"must be one of {GROUPED_IMPLS}, got '{m.grouped_impl}'")
  require(int(m.window) == 0, "model.window", "MoT attention is global (Liang et al. 2024, sec. 2.2): must be 0")
  require(norm_placement(m) in NORM_PLACEMENTS, "model.norm_placement",
          f"must be one of {NORM_PLACEMENTS}, got '{norm_placement(m)}'")


def norm_placement(m) -> str:
  """`model.norm_placement`; 'pre' where a config (an older run's) has no such key."""
  return m.get("norm_placement", "pre")


class AttentionInputs(NamedTuple):
  """What the global attention of every block needs, in sequence order ([batch, length] each)."""
  positions: jax.Array
  segment_ids: jax.Array
  mask: jax.Array | None  # bool [batch, 1, length, length]; None = causal within segments (blockwise)


class MoTBlock(nnx.Module):
  """One layer with modality-untied weights over modality-sorted rows [N, d_model]; its two RMSNorms
  normalise the sublayer inputs ('pre') or outputs ('post', the reference's)."""

  def __init__(self, spec: BlockSpec, n_groups: int, grouped_impl: str, *, rngs: nnx.Rngs, placement: str = "pre"):
    groups, dtype = n_groups, spec.dtype
    d, h, kv, hd = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.resolved_head_dim
    self.n_heads, self.n_kv_heads, self.head_dim = h, kv, hd
    self.attn_norm = ModalityRMSNorm(groups, d, eps=spec.norm_eps, dtype=dtype)
    self.q = ModalityLinear(groups, d, (h, hd), axes=("embed", "heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.k = ModalityLinear(groups, d, (kv, hd), axes=("embed", "kv_heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.v = ModalityLinear(groups, d, (kv, hd), axes=("embed", "kv_heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.o = ModalityLinear(groups, h * hd, d, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                            init_scale=spec.out_scale)
    head_norm = lambda: ModalityRMSNorm(groups, hd, eps=spec.norm_eps, dtype=dtype, axes=("head_dim",))
    self.q_norm = head_norm() if spec.qk_norm else None
    self.k_norm = head_norm() if spec.qk_norm else None
    self.ffn_norm = ModalityRMSNorm(groups, d, eps=spec.norm_eps, dtype=dtype)
    self.gate = ModalityLinear(groups, d, spec.d_ff, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.up = ModalityLinear(groups, d, spec.d_ff, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.down = ModalityLinear(groups, spec.d_ff, d, axes=("mlp", "embed"), rngs=rngs, dtype=dtype,
                               init_scale=spec.out_scale)
    self.rope = (hd, spec.rope_theta)
    self.impl = grouped_impl
    self.post_norm = placement == "post"

  def _attention(self, rows: jax.Array, groups: ModalityGroups | None, ctx: AttentionInputs) -> jax.Array:
    """Untied q/k/v on the sorted rows, global attention in sequence order, untied output projection."""
    batch_shape = ctx.positions.shape
    h, kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
    qkv_w = jnp.concatenate([self.q.weight(), self.k.weight(), self.v.weight()], axis=-1)
    qkv = grouped_linear(rows, qkv_w, groups, impl=self.impl)  # [N, (h + 2kv) hd]
    q, k, v = jnp.split(qkv.reshape(-1, h + 2 * kv, hd), (h, h + kv), axis=1)
    if self.q_norm is not None:  # QK-norm per head, with each row's modality's scale
      q, k = self.q_norm(q, groups), self.k_norm(k, groups)
    qkv = jnp.concatenate([q, k, v], axis=1)
    qkv = from_groups(qkv, groups, batch_shape) if groups is not None else qkv.reshape(*batch_shape, -1, hd)
    q, k, v = jnp.split(qkv, (h, h + kv), axis=2)  # [batch, length, heads, head_dim]
    inv_freq = rope_frequencies(*self.rope)
    q, k = apply_rope(q, ctx.positions, inv_freq), apply_rope(k, ctx.positions, inv_freq)
    if ctx.mask is None:
      out = blockwise_causal_attention(q, k, v, ctx.segment_ids)
    else:
      out = dot_product_attention(q, k, v, ctx.mask)
    out = out.reshape(*batch_shape, h * hd)
    out = to_groups(out, groups) if groups is not None else out.reshape(-1, h * hd)
    return self.o(out, groups, impl=self.impl)

  def _ffn(self, rows: jax.Array, groups: ModalityGroups | None) -> jax.Array:
    gate_up_w = jnp.concatenate([self.gate.weight(), self.up.weight()], axis=-1)
    gate, up = jnp.split(grouped_linear(rows, gate_up_w, groups, impl=self.impl), 2, axis=-1)
    return self.down(jax.nn.silu(gate) * up, groups, impl=self.impl)

  def __call__(self, rows: jax.Array, groups: ModalityGroups | None, ctx: AttentionInputs) -> jax.Array:
    if self.post_norm:  # Chameleon sec. 2.3: normalise what each sublayer adds to the residual stream
      rows = rows + self.attn_norm(self._attention(rows, groups, ctx), groups)
      return rows + self.ffn_norm(self._ffn(rows, groups), groups)
    rows = rows + self._attention(self.attn_norm(rows, groups), groups, ctx)
    return rows + self._ffn(self.ffn_norm(rows, groups), groups)


class MoTTransformer(nnx.Module):
  """The layer stack of both settings: input vectors [batch, length, d_model] and each position's modality
  -> final-normed hidden states [batch, length, d_model]. The rows are sorted by modality once on the way
  in and put back once on the way out."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    spec = block_spec(cfg)
    self.n_groups = n_weight_groups(cfg)
    self.blocks = nnx.List([MoTBlock(spec, self.n_groups, cfg.grouped_impl, rngs=rngs, placement=norm_placement(cfg))
                            for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=spec.dtype)
    self.remat = remat_policy_name(cfg)

  def __call__(self, x: jax.Array, modality: jax.Array, ctx: AttentionInputs) -> jax.Array:
    batch_shape, d = x.shape[:2], x.shape[-1]
    groups = group_by_modality(modality, self.n_groups) if self.n_groups > 1 else None
    rows = to_groups(x, groups) if groups is not None else x.reshape(-1, d)
    for block in self.blocks:
      if self.remat != "none":
        rows = nnx.remat(lambda blk, r: blk(r, groups, ctx), policy=REMAT_POLICIES[self.remat])(block, rows)
      else:
        rows = block(rows, groups, ctx)
    x = from_groups(rows, groups, batch_shape) if groups is not None else rows.reshape(*batch_shape, d)
    return self.final_norm(x)


def default_positions(tokens: jax.Array, positions, segment_ids, modality):
  """The contract's optional inputs: positions 0..L-1, one segment, all text."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  if modality is None:
    modality = jnp.zeros(tokens.shape, jnp.int32)
  return positions, segment_ids, modality


class MoTLM(nnx.Module):
  """The Chameleon setting (Liang et al. 2024, sec. 3.1): discrete tokens of every modality, next-token
  prediction over all of them. `model(inputs, positions, segment_ids, modality) -> logits f32 [B, L, V]`;
  `modality` [B, L] selects the weights each position goes through."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    validate_mot_config(cfg)
    self.cfg = cfg
    dtype = DTYPES[cfg.dtype]
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype)
    self.transformer = MoTTransformer(cfg, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else Linear(
        cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=dtype)

  def hidden(self, tokens, positions=None, segment_ids=None, modality=None) -> jax.Array:
    positions, segment_ids, modality = default_positions(tokens, positions, segment_ids, modality)
    return self.transformer(self.embed(tokens), modality, AttentionInputs(positions, segment_ids, None))

  def logits(self, h: jax.Array) -> jax.Array:
    out = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
    return out.astype(jnp.float32)

  def __call__(self, tokens, positions=None, segment_ids=None, modality=None) -> jax.Array:
    return self.logits(self.hidden(tokens, positions, segment_ids, modality))


class DenseWithModality(DenseLM):
  """`common.models.DenseLM` with the mixed-modal calling convention (the modality is ignored): the Chameleon
  setting's pre-norm dense baseline (the post-norm one is `MoTLM` with `model.untied=False`)."""

  def __call__(self, tokens, positions=None, segment_ids=None, modality=None) -> jax.Array:
    return super().__call__(tokens, positions, segment_ids)
