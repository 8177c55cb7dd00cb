"""Auxiliary routers: causal stand-ins for the batch-wide routing decisions of expert choice and mixture-of-depths.

Expert choice (Zhou et al. 2022) lets each expert pick its top tokens among all tokens of the batch, and MoD
(Raposo et al. 2024) picks the top tokens of a row: a token's routing depends on tokens after it, which a model
decoding one token at a time cannot see. MoMa (Lin et al. 2024, arXiv 2407.21770, the section on inference)
follows MoD (Raposo et al., sec. 3.5): after training, small classifiers are trained with the main model frozen
to predict, from a token's own router input alone, the decision expert choice made for it (binary
cross-entropy per expert, or per layer for MoD), and they route at inference.

Here one two-layer MLP (d -> hidden -> n) per routed layer and expert group: n = the group's experts (a MoMa
modality group, or all experts of a mixed-modal MoE) or 1 (an MoD layer). A token only ever sees the outputs of
its own modality's group; the other experts are not eligible for it.

Causal routing rules (`causal_decisions`):
  * experts, `rule='threshold'` (the default, DEFAULT_RULE): every expert of the token's group whose predicted
    probability > 0.5, the literal reading of the per-expert BCE classifiers; a token may take none (it keeps
    the residual, as a token expert choice dropped) or several. In the reduced study of moma/README.md its
    gap to teacher forcing was about a tenth of top-1's, at fewer experts per token (0.9), so it is the rule
    of the causal figures.
  * experts, `rule='top1'`: the top-1 expert of the token's group. Expert choice with capacity c = 1 / E_m
    gives every expert N_m / E_m tokens, one expert per token on average; top-1 keeps exactly that compute,
    drops no token and never runs two experts. Reported beside the default with its gap.
  * MoD (both rules): the token goes through the block when the predicted probability > 0.5 (Raposo et al.,
    sec. 3.5); the fraction that does is reported, since it is no longer fixed by the capacity.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn import Linear

KINDS = ("experts", "mod")
RULES = ("threshold", "top1")
DEFAULT_RULE = "threshold"


@dataclasses.dataclass(frozen=True)
class ExpertGroup:
  """Experts [start, start + size) of a layer's decision columns, eligible for tokens of `modalities`."""
  modalities: tuple[int, ...]
  start: int
  size: int


@dataclasses.dataclass(frozen=True)
class RoutedLayer:
  """A layer whose routing the aux routers predict: `kind` 'experts' (columns = the layer's experts, split into
  `groups`) or 'mod' (one column: the token goes through the block)."""
  block: int
  kind: str
  groups: tuple[ExpertGroup, ...] = ()

  @property
  def n_columns(self) -> int:
    return 1 if self.kind == "mod" else sum(g.size for g in self.groups)


class AuxRouter(nnx.Module):
  """router input [..., d] -> one logit per decision [..., n]: Linear, SiLU, Linear."""

  def __init__(self, d_model: int, hidden: int, n_out: int, *, rngs: nnx.Rngs):
    self.hidden = Linear(d_model, hidden, axes=("embed", None), rngs=rngs)
    self.out = Linear(hidden, n_out, axes=(None, None), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(jax.nn.silu(self.hidden(x.astype(jnp.float32))))


class AuxRouters(nnx.Module):
  """One AuxRouter per (routed layer, expert group), or per MoD layer."""

  def __init__(self, layers: list[RoutedLayer], d_model: int, hidden: int, *, rngs: nnx.Rngs):
    for layer in layers:
      if layer.kind not in KINDS:
        raise ValueError(f"routed layer kind must be one of {KINDS}, got '{layer.kind}'")
    self.layers = tuple(layers)
    self.nets = nnx.List([
        nnx.List([AuxRouter(d_model, hidden, 1, rngs=rngs)] if layer.kind == "mod" else
                 [AuxRouter(d_model, hidden, g.size, rngs=rngs) for g in layer.groups])
        for layer in layers])

  def logits(self, i: int, x: jax.Array, modality: jax.Array) -> jax.Array:
    """Layer i's logits [B, L, n_columns] from its router input x [B, L, d]; -inf where a column is not
    eligible for the token (another modality's group)."""
    layer, nets = self.layers[i], self.nets[i]
    if layer.kind == "mod":
      return nets[0](x)
    out = jnp.full((*x.shape[:-1], layer.n_columns), -jnp.inf, jnp.float32)
    for group, net in zip(layer.groups, nets):
      mine = jnp.isin(modality, jnp.asarray(group.modalities))[..., None]
      out = out.at[..., group.start:group.start + group.size].set(jnp.where(mine, net(x), -jnp.inf))
    return out


def eligible(layer: RoutedLayer, modality: jax.Array) -> jax.Array:
  """bool [B, L, n_columns]: the decisions that exist for each token (its group's experts; MoD: its one)."""
  if layer.kind == "mod":
    return jnp.ones((*modality.shape, 1), bool)
  cols = [jnp.broadcast_to(jnp.isin(modality, jnp.asarray(g.modalities))[..., None], (*modality.shape, g.size))
          for g in layer.groups]
  return jnp.concatenate(cols, axis=-1)


def bce_sums(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Sums over the valid decisions (bool [B, L, n]) of the binary cross-entropy of sigmoid(logits) against
  targets (the expert-choice decisions), of correct 0.5-threshold predictions, and their count."""
  safe = jnp.where(valid, logits, 0.0)
  y = targets.astype(jnp.float32)
  bce = jnp.maximum(safe, 0.0) - safe * y + jnp.log1p(jnp.exp(-jnp.abs(safe)))  # stable BCE with logits
  w = valid.astype(jnp.float32)
  correct = ((safe > 0) == (y > 0.5)).astype(jnp.float32)
  return dict(bce=jnp.sum(bce * w), correct=jnp.sum(correct * w), count=jnp.sum(w))


def routing_bce(routers: AuxRouters, router_inputs: list[jax.Array], decisions: list[jax.Array],
                modality: jax.Array, token_masks: list[jax.Array]) -> dict[str, jax.Array]:
  """Summed BCE terms over every routed layer, counting in layer i the tokens of token_masks[i] [B, L] only
  (real tokens that reached the layer's router)."""
  total = dict(bce=jnp.zeros(()), correct=jnp.zeros(()), count=jnp.zeros(()))
  for i, (layer, x, target, mask) in enumerate(zip(routers.layers, router_inputs, decisions, token_masks)):
    valid = eligible(layer, modality) & mask[..., None]
    sums = bce_sums(routers.logits(i, x, modality), target.reshape(valid.shape), valid)
    total = {k: total[k] + sums[k] for k in total}
  return total


def causal_decisions(layer: RoutedLayer, logits: jax.Array, rule: str = DEFAULT_RULE) -> jax.Array:
  """bool [B, L, n_columns] from aux logits (see the module docstring): probability > 0.5 for MoD and for
  experts under 'threshold', the top-1 of the token's group for experts under 'top1'."""
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got '{rule}'")
  if layer.kind == "mod" or rule == "threshold":
    return logits > 0.0  # sigmoid(logit) > 0.5; -inf (ineligible) is never chosen
  best = jnp.argmax(logits, axis=-1)
  return jax.nn.one_hot(best, layer.n_columns, dtype=bool) & jnp.isfinite(logits)


def default_hidden(d_model: int) -> int:
  """Hidden width of an aux router: d / 4, at least 16 (a small classifier next to the d x E router)."""
  return max(16, int(math.ceil(d_model / 4)))


# ------------------------------------------------------------------------- the MoMa model's routed layers


def routed_layers(model) -> list[RoutedLayer]:
  """The routed layers of a `moma.model.MoMaLM`, in the order a token meets their decisions: in a block with
  mixture-of-depths, its MoD choice before its experts' choice."""
  from common.data.mixed_modal import MODALITIES
  from common.nn.moe.modality_groups import ModalityExperts
  from moma.mod import MixtureOfDepths
  layers = []
  for i, block in enumerate(model.blocks):
    if isinstance(block, MixtureOfDepths):
      layers.append(RoutedLayer(block=i, kind="mod"))
      block = block.block
    if isinstance(block.ffn, ModalityExperts):
      sizes = block.ffn.settings.experts_per_group
      starts = [sum(sizes[:m]) for m in range(len(sizes))]
      everyone = tuple(range(len(MODALITIES)))  # one mixed-modal group: every token is eligible
      layers.append(RoutedLayer(block=i, kind="experts", groups=tuple(
          ExpertGroup(everyone if len(sizes) == 1 else (m,), starts[m], n) for m, n in enumerate(sizes))))
  return layers


def _forward_args(batch: dict) -> tuple:
  return batch["inputs"], batch["positions"], batch["segment_ids"], batch["modality"]


def _trace(model, batch: dict, routing=None) -> tuple[jax.Array, list[dict]]:
  """`MoMaLM.trace_routing`, dropping the statistics the layers sow (the frozen model keeps no state)."""
  out = model.trace_routing(*_forward_args(batch), routing=routing)
  nnx.pop(model, nnx.Intermediate)
  return out


def routing_targets(model, layers: list[RoutedLayer], batch: dict):
  """(router inputs, expert-choice / MoD decisions, token masks), one of each per routed layer, from the
  model's own routing of `batch` (`MoMaLM.trace_routing`). A layer's mask keeps the real tokens (segment > 0)
  that reached its router: inside a MoD layer, the ones it let through."""
  _, records = _trace(model, batch)
  real = batch["segment_ids"] > 0
  inputs, decisions, masks = [], [], []
  for layer in layers:
    rec = records[layer.block]
    if layer.kind == "mod":
      inputs.append(rec["mod_input"])
      decisions.append(rec["mod_selected"][..., None])
      masks.append(real)
    else:
      inputs.append(rec["expert_input"])
      decisions.append(rec["expert_selected"])
      masks.append(real if rec["mod_selected"] is None else real & rec["mod_selected"])
  return inputs, decisions, masks


def causal_forward(model, routers: AuxRouters, batch: dict, rule: str = DEFAULT_RULE):
  """(logits [B, L, V], decisions, sums) of the model routed by the aux routers alone: layer by layer, each
  routed layer's decisions come from `causal_decisions` on its router input, computed by a pass with all
  earlier decisions fixed (`MoMaLM.trace_routing(routing=...)`); one pass per routed layer, then the final
  one. No decision depends on another token, so the model is causal. decisions: per block, the dict given to
  `routing=`; sums: MoD tokens through and decisions, expert assignments and the tokens they were made for
  (real tokens only)."""
  decided: list[dict] = [{} for _ in model.blocks]
  routing = lambda: [d or None for d in decided]
  modality = batch["modality"]
  real = batch["segment_ids"] > 0
  sums = dict(mod_through=jnp.zeros(()), mod_decisions=jnp.zeros(()), experts_used=jnp.zeros(()),
              expert_tokens=jnp.zeros(()))
  for j, layer in enumerate(routers.layers):
    _, records = _trace(model, batch, routing())
    rec = records[layer.block]
    if layer.kind == "mod":
      chosen = causal_decisions(layer, routers.logits(j, rec["mod_input"], modality), rule)[..., 0]
      decided[layer.block]["mod_selected"] = chosen
      sums["mod_through"] += jnp.sum(chosen & real)
      sums["mod_decisions"] += jnp.sum(real)
    else:
      chosen = causal_decisions(layer, routers.logits(j, rec["expert_input"], modality), rule)
      decided[layer.block]["expert_selected"] = chosen
      reached = real & decided[layer.block].get("mod_selected", True)
      sums["experts_used"] += jnp.sum(chosen & reached[..., None])
      sums["expert_tokens"] += jnp.sum(reached)
  return _trace(model, batch, routing())[0], decided, sums
