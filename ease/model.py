"""EASE's modules (Li et al. 2021, arXiv 2105.06982) and the `model.*` section of its configs.

- `Extractor`: a small bidirectional transformer over the document (`common.nn.Block`s with `causal=False`,
  the document one segment); one logit per token (`level=token`) or per sentence (`level=sentence`, from the
  mean of its tokens' hidden states).
- The mask m: during training a relaxed-Bernoulli (Gumbel-sigmoid) or hard-concrete sample per unit
  (common.nn.relaxed_bernoulli), a sentence's sample shared by its tokens; at inference the top-k units by
  logit, k = max(1, round(budget * units)).
- The abstractor: the dense LM of `common.models.dense_lm` (the model `common.models.hf_llama` imports into and
  the checkpoint library stores), a decoder over `[bos] document [sep] summary` called with the per-key
  attention bias log m on every document key (`key_bias`; -inf where m = 0), for every query, document
  positions included. With a hard mask an unselected token is a key of no query, so nothing computed at any
  other position depends on it: the summary is a function of the evidence alone (tests/ease check it). With a
  relaxed mask the bias scales a kept token's attention weight by m, which is how the summary loss reaches the
  extractor. `model.*` holds the dense LM's keys (`common.configs.base.dense_model`) beside EASE's own
  (`EASE_KEYS`); `model.init_from` names a checkpoint-library entry the abstractor starts from (ease/train.py).
- The objective (the information bottleneck, sec. 3): -log q(y | m * x) + beta * KL(p(m | x) || Bernoulli(pi)),
  the KL averaged over a document's units (Paranjape et al. 2020) so beta means the same at both levels.

Variants: `ease` (the above), `abstractive` (the whole document, no extractor) and `lead` (a fixed
extractor: the first k sentences at the same budget).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from common.config import require
from common.configs.base import dense_model
from common.flops import flops_for
from common.models.dense_lm import DenseLM, block_spec, validate_model_config as validate_dense_config
from common.nn import Block, Embed, Linear, RMSNorm
from common.nn.relaxed_bernoulli import (bernoulli_kl, gumbel_sigmoid, hard_concrete,
                                        hard_concrete_keep_probability)

VARIANTS = ("abstractive", "lead", "ease")
LEVELS = ("sentence", "token")
SAMPLERS = ("gumbel", "hard_concrete")
# The keys of `model.*` that are EASE's; the rest describe the abstractor (a dense-LM section).
EASE_KEYS = ("name", "variant", "level", "pi", "beta", "budget", "sampler", "temperature", "doc_len", "max_units",
             "enc_layers", "init_from")


def model_config(variant: str = "ease", level: str = "sentence", pi: float = 0.3, beta: float = 1.0,
                 **overrides) -> ml_collections.ConfigDict:
  # The abstractor; vocab_size 0: from the data (train.resolve); n_kv_heads 0: n_heads (multi-head attention).
  m = dense_model(vocab_size=0, d_model=128, n_layers=2, n_heads=4, n_kv_heads=0, d_ff=384)
  m.update(dict(
      name="ease", variant=variant, level=level,
      pi=pi,              # the prior's keep probability (the bottleneck's target evidence share)
      beta=beta,          # weight of the KL to the prior
      budget=0.4,         # share of units kept at inference (top-k); lead keeps this share of sentences
      sampler="gumbel", temperature=0.5,
      doc_len=0, max_units=0,  # 0: from the data (resolve)
      enc_layers=1,       # the extractor's layers (its width and heads are the abstractor's)
      init_from="",       # a checkpoint-library entry the abstractor starts from; '' = random init
  ))
  m.update(overrides)
  return m


def abstractor_config(m) -> ml_collections.ConfigDict:
  """The dense-LM section of `model.*` (EASE's own keys dropped; keys a config lacks at their defaults)."""
  own = {k: v for k, v in m.to_dict().items() if k not in EASE_KEYS}
  a = ml_collections.ConfigDict({**dense_model().to_dict(), **own, "name": "dense_lm"})
  a.n_kv_heads = int(a.n_kv_heads) or int(a.n_heads)
  return a


def validate_model_config(m) -> None:
  require(m.variant in VARIANTS, "model.variant", f"unknown variant '{m.variant}' (valid: {', '.join(VARIANTS)})")
  require(m.level in LEVELS, "model.level", f"unknown level '{m.level}' (valid: {', '.join(LEVELS)})")
  require(m.sampler in SAMPLERS, "model.sampler", f"unknown sampler '{m.sampler}' (valid: {', '.join(SAMPLERS)})")
  require(0.0 < float(m.pi) < 1.0, "model.pi", f"must be in (0, 1), got {m.pi}")
  require(float(m.beta) >= 0.0, "model.beta", f"must be >= 0, got {m.beta}")
  require(0.0 < float(m.budget) <= 1.0, "model.budget", f"must be in (0, 1], got {m.budget}")
  require(float(m.temperature) > 0.0, "model.temperature", f"must be positive, got {m.temperature}")
  for key in ("doc_len", "max_units", "enc_layers"):
    require(int(m[key]) > 0, f"model.{key}", f"must be positive, got {m[key]}")
  kv_heads = int(m.get("n_kv_heads", 0))
  require(kv_heads >= 0, "model.n_kv_heads", f"must be >= 0 (0 = model.n_heads), got {kv_heads}")
  validate_dense_config(abstractor_config(m))


class Extractor(nnx.Module):
  """Document -> unit logits: [b, l] per token (token level) or [b, units] per sentence (sentence level)."""

  def __init__(self, m, *, rngs: nnx.Rngs):
    spec = dataclasses.replace(block_spec(abstractor_config(m)), n_layers=int(m.enc_layers), window=0,
                               causal=False)
    self.embed = Embed(m.vocab_size, spec.d_model, rngs=rngs, dtype=spec.dtype)
    self.blocks = nnx.List([Block(spec, rngs=rngs) for _ in range(int(m.enc_layers))])
    self.norm = RMSNorm(spec.d_model, eps=spec.norm_eps, dtype=spec.dtype)
    self.score = Linear(spec.d_model, 1, axes=("embed", None), rngs=rngs)
    self.level = m.level

  def __call__(self, inputs, doc_mask, sent_ids, num_units: int) -> jax.Array:
    length = inputs.shape[1]
    positions = jnp.broadcast_to(jnp.arange(length), inputs.shape)
    # The document is one segment, read both ways; every other position is a segment of its own.
    segments = jnp.where(doc_mask, 1, 2 + jnp.arange(length)[None, :])
    x = self.embed(inputs)
    for block in self.blocks:
      x = block(x, positions, segments)
    h = self.norm(x)
    if self.level == "token":
      return self.score(h)[..., 0].astype(jnp.float32)
    member = (sent_ids[:, None, :] == jnp.arange(1, num_units + 1)[None, :, None]).astype(h.dtype)  # [b, u, l]
    pooled = jnp.einsum("bul,bld->bud", member, h) / jnp.maximum(member.sum(-1, keepdims=True), 1.0)
    return self.score(pooled)[..., 0].astype(jnp.float32)


class EASE(nnx.Module):
  """The extractor (variant `ease` only) and the abstractor (a `DenseLM`; `abstractor` given: that one, e.g.
  a checkpoint-library entry's)."""

  def __init__(self, m, *, rngs: nnx.Rngs, abstractor: DenseLM | None = None):
    validate_model_config(m)
    self.cfg = m
    self.extractor = Extractor(m, rngs=rngs) if m.variant == "ease" else None
    self.abstractor = abstractor if abstractor is not None else DenseLM(abstractor_config(m), rngs=rngs)

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
    return self.extractor(inputs, batch["doc_mask"], batch["sent_ids"], self.num_units(inputs))

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
    return self.abstractor(inputs, key_bias=key_bias(keep))


def key_bias(keep: jax.Array) -> jax.Array:
  """The abstractor's attention bias [b, l]: log keep, -inf where keep == 0 (a key no query sees; no gradient
  flows through the hidden ones)."""
  kept = keep > 0
  return jnp.where(kept, jnp.log(jnp.where(kept, keep, 1.0)), -jnp.inf)


def build_model(m, *, seed: int, abstractor: DenseLM | None = None) -> EASE:
  return EASE(m, rngs=nnx.Rngs(params=seed), abstractor=abstractor)


def flops_per_row(m, seq_len: int) -> float:
  """Training FLOPs of one row: the abstractor's (common.flops, causal attention) and, for `ease`, the
  extractor's (bidirectional, a one-logit head where the LM has its vocabulary projection)."""
  a = abstractor_config(m)
  total = flops_for(a, seq_len).training
  if m.variant == "ease":
    encoder = {k: v for k, v in a.to_dict().items() if k != "moe"}
    encoder.update(n_layers=int(m.enc_layers), window=0)
    count = flops_for(ml_collections.ConfigDict(encoder), seq_len, causal=False)
    total += dataclasses.replace(count, logits=2 * int(a.d_model)).training
  return total * seq_len
