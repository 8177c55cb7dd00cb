"""EASE's modules (Li et al. 2021, arXiv 2105.06982) and the `model.*` section of its configs.

- `Extractor`: a small bidirectional transformer over the document; one logit per token (`level=token`) or
  per sentence (`level=sentence`, from the mean of its tokens' hidden states).
- The mask m: during training a relaxed-Bernoulli (Gumbel-sigmoid) or hard-concrete sample per unit
  (common.nn.relaxed_bernoulli), a sentence's sample shared by its tokens; at inference the top-k units by
  logit, k = max(1, round(budget * units)).
- `Abstractor`: a decoder-only LM over `[bos] document [sep] summary` whose attention adds log m to the score
  of every document key, for every query (document positions included). With a hard mask an unselected token
  is a key of no query, so nothing computed at any other position depends on it: the summary is a function of
  the evidence alone (tests/ease check it). With a relaxed mask the bias scales a kept token's attention
  weight by m, which is how the summary loss reaches the extractor.
- The objective (the information bottleneck, sec. 3): -log q(y | m * x) + beta * KL(p(m | x) || Bernoulli(pi)),
  the KL averaged over a document's units (Paranjape et al. 2020) so beta means the same at both levels.

Variants: `ease` (the above), `abstractive` (the whole document, no extractor) and `lead` (a fixed
extractor: the first k sentences at the same budget).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from common.config import require
from common.nn.embed import Embed
from common.nn.linear import Linear
from common.nn.mlp import SwiGLU
from common.nn.norms import RMSNorm
from common.nn.relaxed_bernoulli import (bernoulli_kl, gumbel_sigmoid, hard_concrete,
                                        hard_concrete_keep_probability)
from common.nn.rope import apply_rope, rope_frequencies

VARIANTS = ("abstractive", "lead", "ease")
LEVELS = ("sentence", "token")
SAMPLERS = ("gumbel", "hard_concrete")
_NEG = -1e30


def model_config(variant: str = "ease", level: str = "sentence", pi: float = 0.3, beta: float = 1.0,
                 **overrides) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict(dict(
      name="ease", variant=variant, level=level,
      pi=pi,              # the prior's keep probability (the bottleneck's target evidence share)
      beta=beta,          # weight of the KL to the prior
      budget=0.4,         # share of units kept at inference (top-k); lead keeps this share of sentences
      sampler="gumbel", temperature=0.5,
      vocab_size=0, doc_len=0, max_units=0,  # 0: from the data (resolve)
      d_model=128, n_layers=2, n_heads=4, d_ff=384, enc_layers=1, rope_theta=10000.0, norm_eps=1e-5,
  ))
  m.update(overrides)
  return m


def validate_model_config(m) -> None:
  require(m.variant in VARIANTS, "model.variant", f"unknown variant '{m.variant}' (valid: {', '.join(VARIANTS)})")
  require(m.level in LEVELS, "model.level", f"unknown level '{m.level}' (valid: {', '.join(LEVELS)})")
  require(m.sampler in SAMPLERS, "model.sampler", f"unknown sampler '{m.sampler}' (valid: {', '.join(SAMPLERS)})")
  require(0.0 < float(m.pi) < 1.0, "model.pi", f"must be in (0, 1), got {m.pi}")
  require(float(m.beta) >= 0.0, "model.beta", f"must be >= 0, got {m.beta}")
  require(0.0 < float(m.budget) <= 1.0, "model.budget", f"must be in (0, 1], got {m.budget}")
  require(float(m.temperature) > 0.0, "model.temperature", f"must be positive, got {m.temperature}")
  require(int(m.d_model) % int(m.n_heads) == 0, "model.n_heads", f"must divide model.d_model={m.d_model}")
  for key in ("vocab_size", "doc_len", "max_units", "d_model", "n_layers", "n_heads", "d_ff", "enc_layers"):
    require(int(m[key]) > 0, f"model.{key}", f"must be positive, got {m[key]}")


class EvidenceAttention(nnx.Module):
  """Multi-head attention with RoPE, a boolean mask and an additive bias per key: scores + key_bias[key].
  common.nn.attention builds its masks from segment ids alone; the evidence mask needs the per-key bias."""

  def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs, rope_theta: float, out_scale: float):
    head_dim = d_model // n_heads
    self.n_heads, self.head_dim, self.rope_theta = n_heads, head_dim, rope_theta
    self.qkv = Linear(d_model, (3, n_heads, head_dim), axes=("embed", None, "heads", "head_dim"), rngs=rngs)
    self.o = Linear(d_model, d_model, axes=("heads", "embed"), rngs=rngs, init_scale=out_scale)

  def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v [b, l, heads, head_dim], RoPE at `positions` on q and k."""
    qkv = self.qkv(x)
    inv_freq = rope_frequencies(self.head_dim, self.rope_theta)
    return apply_rope(qkv[:, :, 0], positions, inv_freq), apply_rope(qkv[:, :, 1], positions, inv_freq), qkv[:, :, 2]

  def attend(self, q, k, v, allowed: jax.Array, key_bias: jax.Array) -> jax.Array:
    """allowed bool [b, q, k]; key_bias [b, k] (0 for plain keys, log m for masked ones)."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim) + key_bias[:, None, None, :]
    scores = jnp.where(allowed[:, None], scores, _NEG)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return self.o(out.reshape(*q.shape[:2], -1))

  def __call__(self, x: jax.Array, positions: jax.Array, allowed: jax.Array, key_bias: jax.Array) -> jax.Array:
    return self.attend(*self.project(x, positions), allowed, key_bias)


class Block(nnx.Module):
  """The pre-norm layer (as common.nn.transformer.Block) over `EvidenceAttention`."""

  def __init__(self, m, n_layers: int, *, rngs: nnx.Rngs):
    scale = 1.0 / math.sqrt(2 * n_layers)
    self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.attn = EvidenceAttention(m.d_model, m.n_heads, rngs=rngs, rope_theta=m.rope_theta, out_scale=scale)
    self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.ffn = SwiGLU(m.d_model, m.d_ff, rngs=rngs, out_scale=scale)

  def __call__(self, x, positions, allowed, key_bias):
    return self.prefill(x, positions, allowed, key_bias)[0]

  def prefill(self, x, positions, allowed, key_bias):
    """The block on a whole row, and its keys and values (the cache `step` continues from)."""
    q, k, v = self.attn.project(self.attn_norm(x), positions)
    x = x + self.attn.attend(q, k, v, allowed, key_bias)
    return x + self.ffn(self.ffn_norm(x)), (k, v)

  def step(self, x, position, cache, allowed, key_bias):
    """One new token x [b, 1, d] at `position`: its key and value written into the cache, then attended
    over the cache with allowed [b, 1, l]."""
    q, k_new, v_new = self.attn.project(self.attn_norm(x), jnp.full(x.shape[:2], position))
    k = jax.lax.dynamic_update_slice_in_dim(cache[0], k_new, position, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(cache[1], v_new, position, axis=1)
    x = x + self.attn.attend(q, k, v, allowed, key_bias)
    return x + self.ffn(self.ffn_norm(x)), (k, v)


class Extractor(nnx.Module):
  """Document -> unit logits: [b, l] per token (token level) or [b, units] per sentence (sentence level)."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    self.embed = Embed(m.vocab_size, m.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(m, m.enc_layers, rngs=rngs) for _ in range(m.enc_layers)])
    self.norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.score = Linear(m.d_model, 1, axes=("embed", None), rngs=rngs)
    self.level = m.level

  def __call__(self, inputs, positions, doc_mask, sent_ids, num_units: int) -> jax.Array:
    allowed = doc_mask[:, :, None] & doc_mask[:, None, :]  # bidirectional, within the document
    allowed |= jnp.eye(inputs.shape[1], dtype=bool)[None]  # non-document rows attend to themselves
    x = self.embed(inputs)
    for block in self.blocks:
      x = block(x, positions, allowed, jnp.zeros(inputs.shape, jnp.float32))
    h = self.norm(x)
    if self.level == "token":
      return self.score(h)[..., 0]
    member = (sent_ids[:, None, :] == jnp.arange(1, num_units + 1)[None, :, None]).astype(h.dtype)  # [b, u, l]
    pooled = jnp.einsum("bul,bld->bud", member, h) / jnp.maximum(member.sum(-1, keepdims=True), 1.0)
    return self.score(pooled)[..., 0]


class EASE(nnx.Module):
  """The extractor (variant `ease` only) and the abstractor."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    validate_model_config(m)
    self.cfg = m
    self.extractor = Extractor(m, rngs=rngs) if m.variant == "ease" else None
    self.embed = Embed(m.vocab_size, m.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(m, m.n_layers, rngs=rngs) for _ in range(m.n_layers)])
    self.norm = RMSNorm(m.d_model, eps=m.norm_eps)

  def num_units(self, inputs) -> int:
    return inputs.shape[1] if self.cfg.level == "token" else int(self.cfg.max_units)

  def units(self, batch) -> tuple[jax.Array, jax.Array]:
    """(valid [b, u] bool, token -> unit one-hot [b, l, u]) for the config's level."""
    doc_mask, sent_ids = batch["doc_mask"], batch["sent_ids"]
    if self.cfg.level == "token":
      return doc_mask, jnp.eye(doc_mask.shape[1], dtype=jnp.float32)[None] * doc_mask[:, :, None]
    u = self.num_units(batch["inputs"])
    onehot = (sent_ids[:, :, None] == jnp.arange(1, u + 1)[None, None, :]).astype(jnp.float32)
    return onehot.sum(1) > 0, onehot

  def unit_logits(self, batch) -> jax.Array:
    inputs = batch["inputs"]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    return self.extractor(inputs, positions, batch["doc_mask"], batch["sent_ids"], self.num_units(inputs))

  def top_k(self, scores: jax.Array, valid: jax.Array, budget: float) -> jax.Array:
    """1.0 for the max(1, round(budget * valid units)) highest-scoring valid units of each row, else 0."""
    k = jnp.maximum(1, jnp.round(budget * valid.sum(-1)))[:, None]
    scores = jnp.where(valid, scores, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1, stable=True)
    return ((rank < k) & valid).astype(jnp.float32)

  def unit_mask(self, batch, *, hard, budget: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(mask over units [b, u] in [0, 1], KL to the prior per row [b] (zeros without an extractor)).
    hard (a bool, or one per row): top-k by score (the lead: by position); else a relaxed sample from
    batch['noise']."""
    m = self.cfg
    budget = float(m.budget if budget is None else budget)
    valid, _ = self.units(batch)
    zeros = jnp.zeros(valid.shape[0])
    if m.variant == "abstractive":
      return valid.astype(jnp.float32), zeros
    if m.variant == "lead":
      return self.top_k(-jnp.arange(valid.shape[1], dtype=jnp.float32)[None], valid, budget), zeros
    logits = self.unit_logits(batch)
    temperature = float(m.temperature)
    if m.sampler == "gumbel":
      p_keep, sampler = jax.nn.sigmoid(logits), gumbel_sigmoid
    else:
      p_keep, sampler = hard_concrete_keep_probability(logits, temperature), hard_concrete
    kl = jnp.sum(bernoulli_kl(p_keep, float(m.pi)) * valid, -1) / jnp.maximum(valid.sum(-1), 1)
    if hard is True:
      return self.top_k(logits, valid, budget), kl
    sample = sampler(logits, batch["noise"][:, :logits.shape[1]], temperature) * valid
    if hard is False:
      return sample, kl
    return jnp.where(jnp.asarray(hard)[:, None] > 0, self.top_k(logits, valid, budget), sample), kl

  def keep(self, batch, unit_mask: jax.Array) -> jax.Array:
    """The mask over input positions [b, l]: document tokens take their unit's value; padding inside the
    document region is hidden; bos, sep and the summary are always kept."""
    _, onehot = self.units(batch)
    doc_keep = jnp.einsum("blu,bu->bl", onehot, unit_mask)
    region = (jnp.arange(batch["inputs"].shape[1]) > 0) & (jnp.arange(batch["inputs"].shape[1]) < self.cfg.doc_len)
    return jnp.where(region[None], jnp.where(batch["doc_mask"], doc_keep, 0.0), 1.0)

  def __call__(self, inputs: jax.Array, keep: jax.Array) -> jax.Array:
    """Logits [b, l, vocab] of the causal abstractor that sees a document key j only with weight keep[j]
    (keep 0: not at all)."""
    return self.prefill(inputs, keep)[0]

  def prefill(self, inputs: jax.Array, keep: jax.Array) -> tuple[jax.Array, list]:
    """(logits [b, l, vocab], the key/value cache of every layer for `step`)."""
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    causal = jnp.tril(jnp.ones((inputs.shape[1],) * 2, bool))[None]
    allowed = causal & (keep > 0)[:, None, :]
    x, caches = self.embed(inputs), []
    for block in self.blocks:
      x, cache = block.prefill(x, positions, allowed, key_bias(keep))
      caches.append(cache)
    return self.embed.attend(self.norm(x)).astype(jnp.float32), caches

  def step(self, tokens: jax.Array, position, caches: list, keep: jax.Array) -> tuple[jax.Array, list]:
    """The cached twin of `__call__` for one token per row at `position` (everything before it in the
    caches): (logits [b, vocab], updated caches)."""
    allowed = ((jnp.arange(keep.shape[1]) <= position)[None] & (keep > 0))[:, None, :]
    x, new = self.embed(tokens[:, None]), []
    for block, cache in zip(self.blocks, caches):
      x, cache = block.step(x, position, cache, allowed, key_bias(keep))
      new.append(cache)
    return self.embed.attend(self.norm(x))[:, 0].astype(jnp.float32), new


def key_bias(keep: jax.Array) -> jax.Array:
  """log keep where keep > 0 (the attention mask hides the rest)."""
  return jnp.log(jnp.where(keep > 0, keep, 1.0))


def build_model(m, *, seed: int) -> EASE:
  return EASE(m, rngs=nnx.Rngs(params=seed))


def flops_per_row(m, seq_len: int) -> float:
  """Training FLOPs of one row (6 x parameters x tokens + attention), extractor included, from the config."""
  def stack(layers: int, d: int, d_ff: int) -> float:
    return layers * (2 * (4 * d * d + 3 * d * d_ff) * seq_len + 4 * d * seq_len * seq_len)
  forward = stack(int(m.n_layers), int(m.d_model), int(m.d_ff)) + 2 * int(m.d_model) * int(m.vocab_size) * seq_len
  if m.variant == "ease":
    forward += stack(int(m.enc_layers), int(m.d_model), int(m.d_ff))
  return 3.0 * forward
