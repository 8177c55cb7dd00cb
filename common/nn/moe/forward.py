"""The mixture-of-experts feed-forward computation as a pure function (`moe_forward`) of its settings and
parameters: token choice (top-k, capacity or dropless) and expert choice. `layer.MoE` is the module around it;
`parallel.py` runs it expert-parallel.

Tokens are routed in `num_groups` groups of equal size (GShard's groups, Lepikhin et al. 2020, sec. 2.2):
capacity, the balancing loss and every statistic are per group, then averaged over groups. The grouping is a
model hyperparameter, not a property of the mesh, so a model computes the same numbers on any mesh; under a
mesh with an `expert` axis the expert-parallel path (`parallel.py`) needs `num_groups` to be a multiple of the
number of token shards.

Padding: with a token mask (True = real token; `Block` passes `segment_ids > 0`) padded tokens are never
routed (no slot, no grouped-matmul row, zero output) and every statistic is a mean over real tokens only:
each group's over its real tokens, groups weighted by their numbers of real tokens (equal weights without
padding; a group of padding only counts for nothing).

Evaluation (`training=False`): token choice with capacity uses `eval_capacity_token_fraction` (fairseq's
`--moe-eval-capacity-token-fraction`): ceil(f * S) slots per expert, or for f <= 0 no capacity at all, so
that a sequence's scores do not depend on the sequences batched with it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from common.kernels.grouped_matmul import IMPLS as GROUPED_IMPLS
from common.nn.moe import exchange
from common.nn.moe import experts as experts_lib
from common.nn.moe import router as router_lib
from common.nn.moe import routing

ROUTINGS = ("token_choice", "expert_choice")
MODES = ("capacity", "dropless")
SECOND_POLICIES = routing.SECOND_POLICIES


@dataclasses.dataclass(frozen=True)
class MoESettings:
  """Static hyperparameters of an MoE layer (hashable: they select code paths, never traced)."""
  n_experts: int
  top_k: int = 2
  routing: str = "token_choice"     # 'token_choice' | 'expert_choice'
  mode: str = "capacity"            # token choice: 'capacity' (GShard/fairseq) | 'dropless' (grouped matmul)
  capacity_factor: float = 1.0      # token choice: slots = cf * k * ceil(S/E); expert choice: cf * S / E
  second_policy: str = "all"        # 'all' | 'sampling' (fairseq, Gumbel) | 'random' (GShard); need an rng
  num_groups: int = 1
  router_noise: float = 0.0         # std of Gaussian noise on the logits (needs an rng)
  balance_weight: float = 0.01      # Artetxe et al. 2021 / fairseq default
  z_loss_weight: float = 0.0
  grouped_impl: str = "auto"        # dropless: grouped-matmul implementation (common.kernels.grouped_matmul)
  eval_capacity_token_fraction: float = 0.0  # token choice with capacity, evaluation: ceil(f * S) slots; <= 0 none
  exchange_slack: float = exchange.EXCHANGE_SLACK  # dropless, expert-parallel: all-to-all buffer size (exchange)

  def __post_init__(self):
    if self.n_experts < 1:
      raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
    if self.routing not in ROUTINGS:
      raise ValueError(f"routing must be one of {ROUTINGS}, got '{self.routing}'")
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got '{self.mode}'")
    if self.routing == "token_choice" and not 1 <= self.top_k <= self.n_experts:
      raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
    if self.second_policy not in SECOND_POLICIES:
      raise ValueError(f"second_policy must be one of {SECOND_POLICIES}, got '{self.second_policy}'")
    if self.grouped_impl not in GROUPED_IMPLS:
      raise ValueError(f"grouped_impl must be one of {GROUPED_IMPLS}, got '{self.grouped_impl}'")
    if self.capacity_factor <= 0 or self.num_groups < 1 or self.exchange_slack <= 0:
      raise ValueError("capacity_factor and exchange_slack must be > 0 and num_groups >= 1")


# ------------------------------------------------------------------------------------ the pure forward

def _group_keys(rng, n_groups: int, group_offset):
  """One key per group from its global index, so that sharded and unsharded runs draw the same noise."""
  if rng is None:
    return None
  return jax.vmap(lambda g: jax.random.fold_in(rng, g))(group_offset + jnp.arange(n_groups))


def _gather_slots(x: jax.Array, dispatch: routing.Dispatch) -> jax.Array:
  """x [G, S, d] -> expert buffers [G, E, C, d] (zeros in empty slots)."""
  x_pad = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
  return jax.vmap(lambda xp, st: xp[st])(x_pad, dispatch.slot_token)


def _scatter_slots(out: jax.Array, dispatch: routing.Dispatch, n_tokens: int) -> jax.Array:
  """Expert outputs [G, E, C, d] weighted by their gates and summed back onto tokens -> [G, S, d] f32."""
  def one(o, st, sg):
    acc = jnp.promote_types(o.dtype, sg.dtype)
    weighted = o.reshape(-1, o.shape[-1]).astype(acc) * sg.reshape(-1, 1)
    return jnp.zeros((n_tokens + 1, o.shape[-1]), acc).at[st.reshape(-1)].add(weighted)[:n_tokens]
  return jax.vmap(one)(out, dispatch.slot_token, dispatch.slot_gate)


def _run_slots(x, dispatch, gate_up, down, expert_axis):
  """Buffers through the experts; under shard_map the buffers travel to the experts' owners and back
  with two all-to-alls over `expert_axis` (GShard sec. 3.2)."""
  buffers = _gather_slots(x, dispatch)  # [G, E, C, d]
  g, e, c, d = buffers.shape
  buffers = buffers.transpose(1, 0, 2, 3).reshape(e, g * c, d)
  if expert_axis is not None:
    buffers = jax.lax.all_to_all(buffers, expert_axis, 0, 1, tiled=True)  # [E_local, shards * G * C, d]
  out = experts_lib.run_batched(buffers, gate_up, down)
  if expert_axis is not None:
    out = jax.lax.all_to_all(out, expert_axis, 1, 0, tiled=True)  # [E, G * C, d]
  out = out.reshape(e, g, c, d).transpose(1, 0, 2, 3)
  return _scatter_slots(out, dispatch, x.shape[1])


def _run_dropless(x, assign: routing.Assignment, gate_up, down, n_experts, expert_axis, impl, slack):
  """Every kept assignment executed as a row of `exchange.run_rows` (those not attempted, padding and
  sampled-out choices, get none), then gated and summed over the token's k choices. Under shard_map the rows
  travel to their experts' shards with a bounded all-to-all (`exchange`)."""
  g, s, d = x.shape
  k = assign.expert.shape[-1]
  expert = jnp.where(assign.kept, assign.expert, n_experts).reshape(-1)  # n_experts: not executed
  token = jnp.arange(g * s * k) // k
  out = exchange.run_rows(x.reshape(g * s, d), token, expert, gate_up, down, impl=impl, expert_axis=expert_axis,
                          slack=slack)
  gate = assign.gate.reshape(g * s, k)
  out = out.reshape(-1, k, d).astype(jnp.promote_types(out.dtype, gate.dtype))
  return jnp.sum(out * gate[..., None], axis=1).reshape(g, s, d)


def _group_mean(per_group: jax.Array, n_real: jax.Array, stat_axes) -> jax.Array:
  """Mean over groups of per-group statistics [G, ...], each group weighted by its number of real tokens
  n_real [G], over the groups of every shard of `stat_axes` (the shard_map axes the groups are split over)."""
  w = n_real.reshape(n_real.shape + (1,) * (per_group.ndim - 1))
  total, count = jnp.sum(per_group * w, axis=0), jnp.sum(n_real)
  if stat_axes:
    total, count = jax.lax.psum((total, count), stat_axes)
  return total / jnp.maximum(count, 1.0)


def moe_forward(settings: MoESettings, params: dict, x: jax.Array, rng: jax.Array | None = None, *,
                mask: jax.Array | None = None, training: bool = True, group_offset=0,
                expert_axis: str | None = None, stat_axes: tuple[str, ...] = ()) -> tuple[jax.Array, dict]:
  """x [G, S, d] -> (y [G, S, d] in x.dtype, aux). `params`: router [d, E], gate_up, down (the local shard of
  experts when `expert_axis` names the shard_map axis they are split over). mask [G, S] bool: True on real
  tokens (None: all real). `training` False: the evaluation capacity (module doc). aux holds means over the
  real tokens (module doc): aux_loss (weighted, to be added to the objective), balance_loss, z_loss,
  router_entropy, fraction_dropped and expert_load [E] (share of routed assignments per expert)."""
  st = settings
  n_groups, n_tokens, _ = x.shape
  keys = _group_keys(rng, n_groups, group_offset)
  router_dtype = jnp.promote_types(x.dtype, jnp.float32)  # f32 (f64 in x64 tests), never bf16
  logits = jnp.einsum("gsd,de->gse", x.astype(router_dtype), params["router"].astype(router_dtype),
                      precision=jax.lax.Precision.HIGHEST)
  routed_logits = logits
  if keys is not None and st.router_noise > 0:
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), logits.shape[1:], logits.dtype))(keys)
    routed_logits = logits + st.router_noise * noise
  probs = jax.nn.softmax(routed_logits, axis=-1)
  sample_keys = None if keys is None else jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
  e = st.n_experts
  real = jnp.ones((n_groups, n_tokens), bool) if mask is None else mask.astype(bool)
  n_real = jnp.sum(real, axis=1).astype(router_dtype)

  if st.routing == "expert_choice":
    capacity = routing.expert_capacity(n_tokens, e, st.capacity_factor)
    dispatch = jax.vmap(lambda p, m: routing.assign_expert_choice(p, capacity, m))(probs, real)
    y = _run_slots(x, dispatch, params["gate_up"], params["down"], expert_axis)
    taken = jax.vmap(lambda t: jnp.zeros(n_tokens + 1, bool).at[t.reshape(-1)].set(True)[:n_tokens])(
        dispatch.slot_token)
    balance = jnp.zeros((n_groups,))
    dropped = 1.0 - jnp.sum(taken & real, axis=1) / jnp.maximum(n_real, 1.0)
    load = jnp.full((n_groups, e), 1.0 / e)
  else:
    if st.mode == "dropless":
      capacity = None
    elif training:
      capacity = routing.token_capacity(n_tokens, e, st.top_k, st.capacity_factor)
    else:
      capacity = routing.eval_capacity(n_tokens, st.eval_capacity_token_fraction)
    assign_fn = lambda p, key, m: routing.assign_token_choice(p, st.top_k, capacity, second_policy=st.second_policy,
                                                               rng=key, mask=m)
    assign = jax.vmap(assign_fn)(probs, sample_keys, real) if sample_keys is not None else \
        jax.vmap(lambda p, m: assign_fn(p, None, m))(probs, real)
    if capacity is not None:
      dispatch = jax.vmap(lambda a: routing.dispatch_from_assignment(a, e, capacity))(assign)
      y = _run_slots(x, dispatch, params["gate_up"], params["down"], expert_axis)
    else:
      y = _run_dropless(x, assign, params["gate_up"], params["down"], e, expert_axis, st.grouped_impl,
                        st.exchange_slack)
    balance = jax.vmap(router_lib.balance_loss)(probs, assign.expert[..., 0], real)
    active = assign.active
    n_active = jnp.maximum(jnp.sum(active, axis=(1, 2)), 1)
    dropped = 1.0 - jnp.sum(assign.kept, axis=(1, 2)) / n_active
    routed = jax.nn.one_hot(assign.expert, e, dtype=jnp.float32) * active[..., None]
    load = jnp.sum(routed, axis=(1, 2)) / n_active[:, None]

  mean = lambda v: _group_mean(v, n_real, stat_axes)
  balance, z = mean(balance), mean(jax.vmap(router_lib.z_loss)(logits, real))
  aux = dict(
      aux_loss=st.balance_weight * balance + st.z_loss_weight * z,
      balance_loss=balance, z_loss=z,
      router_entropy=mean(jax.vmap(router_lib.entropy)(probs, real)),
      fraction_dropped=mean(dropped), expert_load=mean(load))
  return y.astype(x.dtype), aux
