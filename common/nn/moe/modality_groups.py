"""Expert-choice FFN experts split into modality groups: the width sparsity of MoMa (Lin et al. 2024,
"MoMa: Efficient Early-Fusion Pre-training with Mixture of Modality-Aware Experts", arXiv 2407.21770, sec. 2.2).

The experts are partitioned into groups, one per modality (`experts_per_group=(4, 4)`: experts 0-3 for text,
4-7 for image); a token is eligible only for the experts of its own modality's group (hard, modality-aware
partition). Inside a group, routing is expert choice (Zhou et al. 2022, arXiv 2202.09368, sec. 3.1) with a
sigmoid score (MoMa eq. 1): expert e of group m takes its top `cap_e = min(N_m, ceil(capacity_factor * N_m /
E_m))` tokens of modality m, N_m the tokens of that modality in the routing group, E_m the group's experts
(capacity_factor 1 = each expert takes c N_m tokens with c = 1 / E_m, so the group processes N_m tokens in all).
A token of negative modality takes part in no routing: it is not counted in N_m, never taken, and left out of
the statistics and the z-loss (padding, which `moma.model` marks so, and the tokens a mixture-of-depths layer
skips); a routing group's statistics weigh by its routed tokens, so a group of padding alone counts for nothing.
A token's output is sum over the experts that took it of sigmoid(score) * expert(x); a token taken by none
keeps only the residual. With a single group every token is eligible for every expert: the mixed-modal
expert-choice MoE baseline is this same code.

Exact and static-shaped execution: the selected (expert, token) pairs of a routing group of S tokens number
sum_e cap_e < capacity_factor * S + E, so a buffer of `ceil(capacity_factor * S) + E` rows sorted by expert
(row order = expert-major, token order inside an expert) with per-expert group sizes cap_e feeds the grouped
matmul of `common.nn.moe.experts.run_grouped` at the true FLOPs. Externally supplied selections (auxiliary
routers at inference, MoMa sec. 2.4) have no such bound: a token may go to every expert of its group, so the
buffer is S * max_m E_m rows there.

Training noise (`router_noise` > 0, training only, `common.nn.training_rng`): logistic noise (the difference
of two Gumbel variables, the Gumbel-sigmoid of MoMa sec. 2.2) times `router_noise` on the logits, used for both
the choice and the gate. Under a mesh with an `expert` axis, experts are split over it and each shard routes
its own routing groups, and the selected rows travel to their experts' shards and back with the bounded
all-to-all of `exchange.py` (as the dropless token-choice layer's).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from common.kernels.grouped_matmul import IMPLS as GROUPED_IMPLS
from common.nn.moe import exchange
from common.nn.moe import experts as experts_lib
from common.nn.moe import router as router_lib
from common.nn.moe.parallel import EXPERT_AXIS, current_expert_mesh, token_axes
from common.nn.training_rng import next_training_key


@dataclasses.dataclass(frozen=True)
class GroupSettings:
  """Static hyperparameters of a modality-grouped expert-choice layer (hashable; never traced)."""
  experts_per_group: tuple[int, ...]  # experts of modality 0 (text), 1 (image), ...; one entry = mixed-modal
  capacity_factor: float = 1.0        # expert e of group m takes ceil(capacity_factor * N_m / E_m) tokens
  routing_groups: int = 1             # tokens are ranked within this many equal slices of the batch; 0 = one
                                      # per sequence (per row of x [B, L, d]: no ranking across rows)
  router_noise: float = 0.0           # scale of the logistic noise on the logits (training only)
  z_loss_weight: float = 0.0
  grouped_impl: str = "auto"          # common.kernels.grouped_matmul implementation
  exchange_slack: float = exchange.EXCHANGE_SLACK  # expert-parallel all-to-all buffer size (exchange.py)

  def __post_init__(self):
    if not self.experts_per_group or min(self.experts_per_group) < 1:
      raise ValueError(f"experts_per_group must be positive counts, got {self.experts_per_group}")
    if self.capacity_factor <= 0 or self.routing_groups < 0 or self.exchange_slack <= 0:
      raise ValueError("capacity_factor and exchange_slack must be > 0 and routing_groups >= 0 (0 = one per "
                       "sequence)")
    if self.grouped_impl not in GROUPED_IMPLS:
      raise ValueError(f"grouped_impl must be one of {GROUPED_IMPLS}, got '{self.grouped_impl}'")

  @property
  def n_experts(self) -> int:
    return sum(self.experts_per_group)

  @property
  def expert_group(self) -> tuple[int, ...]:
    """The modality group of each expert, in expert order."""
    return tuple(g for g, n in enumerate(self.experts_per_group) for _ in range(n))

  def token_group(self, modality: jax.Array) -> jax.Array:
    """The group a token may reach: its modality (-1 for a modality without experts); 0 for every token when
    there is a single, mixed-modal group. A negative modality marks a token that takes part in no routing
    (a token a mixture-of-depths layer skips)."""
    modality = modality.astype(jnp.int32)
    if len(self.experts_per_group) == 1:
      return jnp.where(modality >= 0, 0, -1)
    return jnp.where((modality >= 0) & (modality < len(self.experts_per_group)), modality, -1)

  def n_routing_groups(self, shape: tuple[int, ...]) -> int:
    """Routing groups of tokens x of `shape` [..., d]: `routing_groups`, or with 0 one per sequence (the
    product of the axes before [L, d]; 1 for flat tokens [T, d])."""
    return self.routing_groups or math.prod(shape[:-2])

  def rows_per_group(self, n_tokens: int, *, external: bool = False) -> int:
    """Static rows of the expert buffer for one routing group of n_tokens tokens (see the module doc)."""
    bound = n_tokens * max(self.experts_per_group)
    if not external:
      bound = min(bound, math.ceil(self.capacity_factor * n_tokens) + self.n_experts)
    return bound


# ------------------------------------------------------------------------------------------- the routing

def expert_capacities(n_eligible: jax.Array, group_sizes: jax.Array, capacity_factor: float) -> jax.Array:
  """cap_e = min(N_m, ceil(capacity_factor * N_m / E_m)) per expert, from its group's N_m and E_m [E]."""
  n = n_eligible.astype(jnp.int32)
  if capacity_factor == 1.0:
    cap = (n + group_sizes - 1) // group_sizes  # exact integer ceil for the default
  else:
    cap = jnp.ceil(capacity_factor * n.astype(jnp.float32) / group_sizes).astype(jnp.int32)
  return jnp.minimum(cap, n)


def expert_choice_in_groups(logits: jax.Array, token_group: jax.Array, settings: GroupSettings) -> jax.Array:
  """Which expert takes which token in one routing group: logits [S, E], token_group [S] (-1: none) ->
  selected [S, E] bool. Each expert ranks the tokens of its group by score (ties: lower token index first)
  and takes the first cap_e (`expert_capacities`)."""
  n_tokens, n_experts = logits.shape
  expert_group = jnp.asarray(settings.expert_group, jnp.int32)
  group_size = jnp.asarray(settings.experts_per_group, jnp.int32)[expert_group]  # E_m of each expert [E]
  eligible = token_group[:, None] == expert_group[None, :]  # [S, E]
  cap = expert_capacities(jnp.sum(eligible, axis=0), group_size, settings.capacity_factor)
  k_max = min(n_tokens, math.ceil(settings.capacity_factor * n_tokens / min(settings.experts_per_group)))
  masked = jnp.where(eligible, logits, -jnp.inf).T  # [E, S]; ineligible tokens rank last
  _, ranked = jax.lax.top_k(masked, k_max)  # [E, k_max] tokens in score order
  take = jnp.arange(k_max)[None, :] < cap[:, None]
  picked = jnp.where(take, ranked, n_tokens)  # n_tokens = nobody
  selected = jnp.zeros((n_experts, n_tokens + 1), bool).at[jnp.arange(n_experts)[:, None], picked].set(True)
  return selected[:, :n_tokens].T


def selection_rows(selected: jax.Array, n_rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The expert buffer of a selection [T, E]: (token [R], expert [R], group_sizes [E]), rows sorted by
  expert then token; rows past the selected pairs have expert E (no group) and token 0. The group sizes are
  counted on the rows, so they always describe the buffer."""
  n_tokens, n_experts = selected.shape
  flat = jnp.nonzero(selected.T.reshape(-1), size=n_rows, fill_value=n_experts * n_tokens)[0]
  expert = (flat // n_tokens).astype(jnp.int32)
  return (flat % n_tokens).astype(jnp.int32), expert, jnp.bincount(expert, length=n_experts).astype(jnp.int32)


def run_selected(x: jax.Array, selected: jax.Array, gates: jax.Array, gate_up: jax.Array, down: jax.Array,
                 n_rows: int, *, impl: str = "auto", expert_axis: str | None = None,
                 slack: float = exchange.EXCHANGE_SLACK) -> jax.Array:
  """sum_e selected[t, e] * gates[t, e] * expert_e(x[t]): x [T, d], selected and gates [T, E] -> [T, d] f32.
  Under shard_map with `expert_axis`, gate_up/down hold this shard's experts and the rows travel to their
  experts' shards and back (`exchange.run_rows`); n_rows: the row budget of this shard's tokens."""
  token, expert, _ = selection_rows(selected, n_rows)
  out = exchange.run_rows(x, token, expert, gate_up, down, impl=impl, expert_axis=expert_axis, slack=slack)
  row_gate = jnp.where(expert < gates.shape[1], gates[token, jnp.minimum(expert, gates.shape[1] - 1)], 0.0)
  acc = jnp.promote_types(out.dtype, gates.dtype)
  return jnp.zeros((x.shape[0], x.shape[1]), acc).at[token].add(out.astype(acc) * row_gate[:, None])


# ------------------------------------------------------------------------------------ the pure forward

def _routing_stats(logits, selected, token_group, settings) -> dict:
  """Statistics of one routing group over its routed tokens (token_group >= 0): z-loss, mean binary entropy of
  the eligible sigmoid scores, the share of routed tokens taken by no expert, and each expert's share of the
  selected pairs."""
  expert_group = jnp.asarray(settings.expert_group, jnp.int32)
  eligible = token_group[:, None] == expert_group[None, :]
  p = jax.nn.sigmoid(logits)
  bernoulli = -(p * jnp.log(jnp.maximum(p, 1e-20)) + (1 - p) * jnp.log(jnp.maximum(1 - p, 1e-20)))
  has_group = token_group >= 0
  n_routed = jnp.maximum(jnp.sum(has_group), 1)
  taken = jnp.any(selected, axis=-1)
  counts = jnp.sum(selected, axis=0).astype(jnp.float32)
  return dict(  # z-loss: ST-MoE's mean squared log-partition (Zoph et al. 2022, eq. 5), over the routed tokens
      z_loss=jnp.sum(jnp.where(has_group, jax.nn.logsumexp(logits, axis=-1) ** 2, 0.0)) / n_routed,
      router_entropy=jnp.sum(jnp.where(eligible, bernoulli, 0.0)) / jnp.maximum(jnp.sum(eligible), 1),
      fraction_dropped=jnp.sum(has_group & ~taken) / n_routed,
      expert_load=counts / jnp.maximum(jnp.sum(counts), 1.0))


def _pool(stats: dict, weight: jax.Array, axes=None) -> dict:
  """Means of per-routing-group statistics [G, ...] weighted by weight [G] (each group's routed tokens), over
  the mesh's token `axes` too when given; zeros when nothing was routed."""
  sums = jax.tree.map(lambda v: jnp.tensordot(weight, v, axes=1), stats)
  total = jnp.sum(weight)
  if axes is not None:
    sums, total = jax.lax.psum((sums, total), axes)
  return jax.tree.map(lambda v: v / jnp.maximum(total, 1.0), sums)


def grouped_expert_forward(settings: GroupSettings, params: dict, x: jax.Array, token_group: jax.Array,
                           rng: jax.Array | None = None, selected: jax.Array | None = None, *,
                           group_offset=0, expert_axis: str | None = None, pool_axes=None):
  """x [G, S, d], token_group [G, S] -> (y [G, S, d] in x.dtype, aux, selected [G, S, E]). `selected` given:
  those decisions (restricted to each token's group) replace the expert choice. aux: means over the routed
  tokens' groups (`_pool`, also over the mesh axes `pool_axes`) of aux_loss, balance_loss (0: expert choice
  balances by construction), z_loss, router_entropy, fraction_dropped and expert_load [E]."""
  st = settings
  n_groups, n_tokens, d = x.shape
  router_dtype = jnp.promote_types(x.dtype, jnp.float32)
  logits = jnp.einsum("gsd,de->gse", x.astype(router_dtype), params["router"].astype(router_dtype),
                      precision=jax.lax.Precision.HIGHEST)
  routed = logits
  if rng is not None and st.router_noise > 0:
    keys = jax.vmap(lambda g: jax.random.fold_in(rng, g))(group_offset + jnp.arange(n_groups))
    u = jax.vmap(lambda k: jax.random.uniform(k, logits.shape[1:], logits.dtype, 1e-6, 1 - 1e-6))(keys)
    routed = logits + st.router_noise * (jnp.log(u) - jnp.log1p(-u))
  eligible = token_group[..., None] == jnp.asarray(st.expert_group, jnp.int32)
  external = selected is not None
  if external:
    selected = selected.astype(bool) & eligible
  else:
    selected = jax.vmap(lambda lg, tg: expert_choice_in_groups(lg, tg, st))(routed, token_group)
  gates = jnp.where(selected, jax.nn.sigmoid(routed), 0.0)
  n_rows = n_groups * st.rows_per_group(n_tokens, external=external)
  y = run_selected(x.reshape(-1, d), selected.reshape(-1, st.n_experts), gates.reshape(-1, st.n_experts),
                   params["gate_up"], params["down"], n_rows, impl=st.grouped_impl, expert_axis=expert_axis,
                   slack=st.exchange_slack)
  stats = jax.vmap(lambda lg, s, tg: _routing_stats(lg, s, tg, st))(logits, selected, token_group)
  aux = _pool(stats, jnp.sum(token_group >= 0, axis=1).astype(router_dtype), pool_axes)
  aux.update(balance_loss=jnp.zeros((), router_dtype), aux_loss=st.z_loss_weight * aux["z_loss"])
  return y.reshape(x.shape).astype(x.dtype), aux, selected


def _sharded_forward(settings: GroupSettings, params: dict, tokens, token_group, rng, selected, mesh,
                     n_groups: int):
  """`grouped_expert_forward` on tokens [T, d] in n_groups routing groups with experts split over the mesh's
  `expert` axis."""
  axes = token_axes(mesh)
  n_shards = math.prod(mesh.shape[a] for a in axes)
  ep = mesh.shape[EXPERT_AXIS]
  if settings.n_experts % ep:
    raise ValueError(f"moma experts ({settings.n_experts}) are not divisible by the expert mesh axis ({ep})")
  if n_groups % n_shards or tokens.shape[0] % n_groups:
    raise ValueError(f"moma.routing_groups={settings.routing_groups} ({n_groups} routing groups) must be a multiple "
                     f"of the {n_shards} token shards of the mesh {dict(mesh.shape)} and divide the "
                     f"{tokens.shape[0]} tokens")
  local_groups = n_groups // n_shards
  d = tokens.shape[-1]
  spec = P(axes if len(axes) > 1 else axes[0])

  def body(router, gate_up, down, x, group, key, chosen):
    shard = 0
    for a in axes:
      shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
    y, aux, sel = grouped_expert_forward(
        settings, dict(router=router, gate_up=gate_up, down=down), x.reshape(local_groups, -1, d),
        group.reshape(local_groups, -1), key, None if chosen is None else chosen.reshape(local_groups, -1,
                                                                                         settings.n_experts),
        group_offset=shard * local_groups, expert_axis=EXPERT_AXIS, pool_axes=axes)
    return y.reshape(-1, d), aux, sel.reshape(-1, settings.n_experts)

  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(P(), P(EXPERT_AXIS), P(EXPERT_AXIS), spec, spec,
                               None if rng is None else P(), None if selected is None else spec),
                     out_specs=(spec, P(), spec))
  return fn(params["router"], params["gate_up"], params["down"], tokens, token_group, rng, selected)


# ------------------------------------------------------------------------------------------- the module

class ModalityExperts(nnx.Module):
  """Modality-grouped expert-choice SwiGLU FFN: (x [..., d_model], modality [...]) -> [..., d_model].
  Router and experts stored f32; experts computed in `dtype`, the router in f32."""

  def __init__(self, d_model: int, d_ff: int, settings: GroupSettings, *, rngs: nnx.Rngs, dtype=jnp.float32,
               out_scale: float = 1.0, expert_parallel: bool = True):
    self.settings = settings
    self.router = router_lib.Router(d_model, settings.n_experts, rngs=rngs)
    self.experts = experts_lib.Experts(settings.n_experts, d_model, d_ff, rngs=rngs, out_scale=out_scale)
    self.dtype = dtype
    self.expert_parallel = expert_parallel

  def params(self) -> dict:
    return dict(router=self.router.kernel[...], gate_up=self.experts.gate_up[...], down=self.experts.down[...])

  def apply(self, x: jax.Array, modality: jax.Array, rng: jax.Array | None = None,
            selected: jax.Array | None = None) -> tuple[jax.Array, dict, jax.Array]:
    """(y, aux, selected [..., E]) without sowing. `rng`: router noise (training). `selected` [..., E]: run
    these decisions instead of the expert choice (auxiliary routers, MoMa sec. 2.4)."""
    shape, st = x.shape, self.settings
    tokens = x.reshape(-1, shape[-1]).astype(self.dtype)
    group = st.token_group(modality.reshape(-1))
    chosen = None if selected is None else selected.reshape(-1, st.n_experts)
    g = st.n_routing_groups(shape)
    if tokens.shape[0] % g:
      raise ValueError(f"moma.routing_groups={st.routing_groups} does not divide the {tokens.shape[0]} tokens")
    mesh = current_expert_mesh() if self.expert_parallel else None
    if mesh is not None:
      y, aux, sel = _sharded_forward(st, self.params(), tokens, group, rng, chosen, mesh, g)
    else:
      y, aux, sel = grouped_expert_forward(
          st, self.params(), tokens.reshape(g, -1, shape[-1]), group.reshape(g, -1), rng,
          None if chosen is None else chosen.reshape(g, -1, st.n_experts))
    return y.reshape(shape), aux, sel.reshape(*shape[:-1], st.n_experts)

  def __call__(self, x: jax.Array, modality: jax.Array, selected: jax.Array | None = None):
    """(y, selected); inside a train step the router noise draws from `common.nn.training_rng`. Sows its
    aux into `nnx.Intermediate` 'moe_aux' (the keys of `common.nn.moe.moe_loss_terms`)."""
    y, aux, sel = self.apply(x, modality, next_training_key(), selected)
    self.sow(nnx.Intermediate, "moe_aux", aux)
    return y, sel
