"""The MoMa language model (Lin et al. 2024, "MoMa: Efficient Early-Fusion Pre-training with Mixture of
Modality-Aware Experts", arXiv 2407.21770): a Chameleon-style early-fusion decoder whose attention is shared by
all modalities (the paper's default) and whose FFNs are, per `model.moma`:
  * `experts=()`: the dense SwiGLU (the dense baseline);
  * `experts=(E,)`: one group of E expert-choice experts that every token may reach (mixed-modal MoE);
  * `experts=(E_text, E_image[, E_audio])`: modality groups, expert choice inside each (MoMa, sec. 2.2;
    `common.nn.moe.modality_groups`), in every `every`-th layer (the others keep the dense SwiGLU);
and `mod_layers` (0-based layer indices) wraps those layers in mixture-of-depths (`moma.mod`, sec. 2.3) with
`mod_capacity` of each row's real tokens going through.

Called as `model(inputs, positions, segment_ids, modality) -> logits f32 [B, L, V]` (the mixed-modal contract);
padding (segment id 0) is routed nowhere: the expert layers see it with modality -1 (no group: it takes no
expert slot and is not counted in any capacity or statistic) and MoD layers never let it through, so the real
tokens' logits do not depend on the padding. Routing statistics are sown into `nnx.Intermediate` ('moe_aux'
per expert layer, 'mod_aux' per routed layer) and `moma_loss_terms(model, weight)` turns them into the objective
term and metrics after a forward pass. `model.moma.routing_groups=0` ranks the tokens of each sequence apart
(expert choice then sees no other row; it still sees the sequence's later tokens).

For the auxiliary routers of causal inference (MoMa sec. 2.4) two entry points:
  * `model.trace_routing(inputs, positions, segment_ids, modality) -> (logits, records)`: `records[i]` for
    layer i is a dict with `mod_input` [B, L, d] (the MoD router's input, the block input), `mod_logits` [B, L]
    and `mod_selected` [B, L] bool (these three None in a layer without MoD), `expert_input` [B, L, d] (the
    normed hidden state the expert router reads; zeros at tokens a MoD layer skipped) and `expert_selected`
    [B, L, E] bool (which expert took which token; these two None in a layer without experts). These are the
    training inputs and targets of the auxiliary routers; `trace_routing(..., routing=)` traces a pass with
    some decisions supplied.
  * `model(..., routing=decisions)`: `decisions[i]` None or a dict with optional `mod_selected` [B, L] bool and
    `expert_selected` [B, L, E] bool used instead of layer i's top-k choices (a token may then go to any number
    of its group's experts; MoD runs in its masked full-length form). Feeding back a trace's own decisions
    reproduces its logits; decisions made causally (by auxiliary routers) give a causal model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import require
from common.kernels.grouped_matmul import IMPLS as GROUPED_IMPLS
from common.models.dense_lm import block_spec, validate_model_config
from common.nn import Block, Embed, Linear, RMSNorm
from common.nn.moe import moe_loss_terms
from common.nn.moe.modality_groups import GroupSettings, ModalityExperts
from moma.mod import MixtureOfDepths


def validate_moma_config(m) -> None:
  """Checks the model section once, naming the offending key."""
  validate_model_config(m)
  mm = m.moma
  experts = tuple(int(e) for e in mm.experts)
  require(all(e >= 1 for e in experts), "model.moma.experts",
          f"must be positive expert counts per modality group (() = dense), got {tuple(mm.experts)}")
  require(1 <= int(mm.every) <= int(m.n_layers), "model.moma.every",
          f"must be in [1, model.n_layers={m.n_layers}], got {mm.every}")
  require(float(mm.capacity_factor) > 0, "model.moma.capacity_factor", f"must be > 0, got {mm.capacity_factor}")
  require(int(mm.routing_groups) >= 0, "model.moma.routing_groups",
          f"must be >= 0 (0 = one per sequence), got {mm.routing_groups}")
  require(float(mm.router_noise) >= 0, "model.moma.router_noise", f"must be >= 0, got {mm.router_noise}")
  require(int(mm.d_ff) >= 0, "model.moma.d_ff", f"must be >= 0 (0 = model.d_ff), got {mm.d_ff}")
  require(mm.grouped_impl in GROUPED_IMPLS, "model.moma.grouped_impl",
          f"must be one of {GROUPED_IMPLS}, got '{mm.grouped_impl}'")
  require(float(mm.get("exchange_slack", 2.0)) > 0, "model.moma.exchange_slack",
          f"must be > 0, got {mm.get('exchange_slack')}")
  layers = tuple(int(i) for i in mm.mod_layers)
  require(all(0 <= i < int(m.n_layers) for i in layers) and len(set(layers)) == len(layers),
          "model.moma.mod_layers", f"must be distinct layer indices in [0, {m.n_layers}), got {layers}")
  require(0 < float(mm.mod_capacity) <= 1, "model.moma.mod_capacity", f"must be in (0, 1], got {mm.mod_capacity}")
  require(not layers or int(m.window) == 0, "model.window",
          "a sliding window counts gathered tokens, not positions, in mixture-of-depths layers: use 0")


def is_expert_layer(m, index: int) -> bool:
  """Whether block `index` (0-based) has the expert FFN: every `every`-th block, as `common.models`."""
  return bool(tuple(m.moma.experts)) and (index + 1) % int(m.moma.every) == 0


def group_settings(m) -> GroupSettings:
  mm = m.moma
  return GroupSettings(experts_per_group=tuple(int(e) for e in mm.experts),
                       capacity_factor=float(mm.capacity_factor), routing_groups=int(mm.routing_groups),
                       router_noise=float(mm.router_noise), z_loss_weight=float(mm.z_loss_weight),
                       grouped_impl=mm.grouped_impl, exchange_slack=float(mm.get("exchange_slack", 2.0)))


class MoMaBlock(Block):
  """The pre-norm block with shared attention and a dense or modality-grouped expert FFN, called as
  (x, positions, segment_ids, modality, expert_selected) -> (x, info) with the expert router's input and
  decisions in info."""

  def __call__(self, x, positions, segment_ids, modality, expert_selected=None):
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    h = self.ffn_norm(x)
    if isinstance(self.ffn, ModalityExperts):
      y, selected = self.ffn(h, modality, expert_selected)
      return x + y, dict(expert_input=h, expert_selected=selected)
    return x + self.ffn(h), dict(expert_input=None, expert_selected=None)


class MoMaLM(nnx.Module):
  """(inputs, positions, segment_ids, modality) [batch, length] -> logits [batch, length, vocab] (f32)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    validate_moma_config(cfg)
    self.cfg = cfg
    spec = block_spec(cfg)
    dtype = spec.dtype
    expert_ff = int(cfg.moma.d_ff) or int(cfg.d_ff)
    mod_layers = {int(i) for i in cfg.moma.mod_layers}
    blocks = []
    for i in range(cfg.n_layers):
      ffn = None
      if is_expert_layer(cfg, i):
        ffn = ModalityExperts(cfg.d_model, expert_ff, group_settings(cfg), rngs=rngs, dtype=dtype,
                              out_scale=spec.out_scale, expert_parallel=bool(cfg.moma.expert_parallel))
      block = MoMaBlock(spec, rngs=rngs, ffn=ffn)
      if i in mod_layers:
        block = MixtureOfDepths(block, cfg.d_model, float(cfg.moma.mod_capacity), rngs=rngs)
      blocks.append(block)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.lm_head = None if cfg.tie_embeddings else Linear(
        cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=dtype)

  def _run(self, inputs, positions, segment_ids, modality, routing):
    """(final normed hidden [B, L, d], per-layer records; see the module doc)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(inputs)
    if modality is None:
      modality = jnp.zeros_like(inputs)
    modality = jnp.where(segment_ids > 0, modality, -1)  # padding reaches no expert group
    x = self.embed(inputs)
    records = []
    for i, block in enumerate(self.blocks):
      decided = (routing[i] if routing is not None else None) or {}
      if isinstance(block, MixtureOfDepths):
        x_in = x
        x, info = block(x, positions, segment_ids, modality, selected=decided.get("mod_selected"),
                        expert_selected=decided.get("expert_selected"))
        info = dict(info, mod_input=x_in)
      else:
        x, info = block(x, positions, segment_ids, modality, decided.get("expert_selected"))
        info = dict(info, mod_input=None, mod_logits=None, mod_selected=None)
      records.append(info)
    return self.final_norm(x), records

  def logits(self, h: jax.Array) -> jax.Array:
    out = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
    return out.astype(jnp.float32)

  def __call__(self, inputs, positions=None, segment_ids=None, modality=None, *, routing=None) -> jax.Array:
    return self.logits(self._run(inputs, positions, segment_ids, modality, routing)[0])

  def trace_routing(self, inputs, positions=None, segment_ids=None, modality=None, *, routing=None):
    """(logits, records): the forward pass with each layer's router inputs and decisions (module doc)."""
    h, records = self._run(inputs, positions, segment_ids, modality, routing)
    return self.logits(h), records


def moma_loss_terms(model: nnx.Module, weight: jax.Array) -> tuple[jax.Array, dict]:
  """(objective term, metric sums) after a forward pass, as `common.nn.moe.moe_loss_terms` (expert layers:
  `moe/*` metrics, per-expert load) plus `mod/selected_fraction` and `mod/router_weight` (mean sigmoid weight
  of the chosen tokens) averaged over the MoD layers, each times `weight`. Pops what the layers sowed."""
  mod_state = nnx.pop(model, nnx.All(nnx.Intermediate, nnx.PathContains("mod_aux")))
  term, sums = moe_loss_terms(model, weight)
  auxes = []
  for _, value in nnx.to_flat_state(mod_state):
    v = value.get_value() if hasattr(value, "get_value") else value
    auxes.extend(v if isinstance(v, tuple) else (v,))
  if auxes:
    mean = jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *auxes)
    sums.update({f"mod/{k}": weight * v for k, v in mean.items()})
  return term, sums


def build_moma_model(model_cfg, seed: int = 0) -> MoMaLM:
  """The model of a `moma_lm` config (`model.vocab_size` resolved), parameters from `seed`."""
  return MoMaLM(model_cfg, rngs=nnx.Rngs(params=seed))
