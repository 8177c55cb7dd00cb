"""Routing decisions of mixture-of-experts layers, as pure functions of the router's logits for one group of
tokens. The layers (`layer.py`) vmap them over groups and execute the decisions.

Token choice (each token picks its top-k experts):
  * GShard (Lepikhin et al. 2020, arXiv 2006.16668, Algorithm 1) and fairseq's `top1gating`/`top2gating`
    (the code behind Artetxe et al. 2021, arXiv 2112.10684): an expert takes at most
    `capacity = ceil(capacity_factor * k * ceil(S / E))` assignments; first choices claim slots before second
    choices, each in token order; an assignment past the capacity is dropped, and the gates of the kept
    choices of a top-2 token are renormalised to sum to one (a token with both dropped only keeps its
    residual). Top-1 keeps the raw softmax probability as its gate, as in Switch (Fedus et al. 2021,
    arXiv 2101.03961, sec. 2.1), so the router still receives a gradient.
  * The second choice of a top-2 token is kept always (`second_policy='all'`) or with probability
    `2 * g2 / (g1 + g2)` (`'sampling'`, GShard sec. 2.2); sampled-out choices claim no capacity.
Expert choice (Zhou et al. 2022, arXiv 2202.09368, sec. 3.1): each expert takes its top
`ceil(capacity_factor * S / E)` tokens by softmax score; a token may be taken by several experts or none.

Both capacity-based routings produce a `Dispatch`: for each expert slot the token that fills it (S = empty)
and its gate; dropless routing produces the plain (expert, gate) assignment of every token.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_EPS = 1e-9


class Dispatch(NamedTuple):
  """Slots of a capacity-bounded routing of one group of S tokens."""
  slot_token: jax.Array  # [E, C] int32: token in each slot; S marks an empty slot
  slot_gate: jax.Array   # [E, C] f32: its combine weight (0 for an empty slot)


class Assignment(NamedTuple):
  """Token-choice decisions of one group (before any execution)."""
  expert: jax.Array    # [S, k] int32, the chosen experts in rank order
  gate: jax.Array      # [S, k] f32 combine weights (0 where dropped or sampled out)
  active: jax.Array    # [S, k] bool: the assignment is attempted (not sampled out)
  kept: jax.Array      # [S, k] bool: the assignment is executed (attempted and within capacity)
  position: jax.Array  # [S, k] int32: its slot in the expert's buffer (meaningful where kept)


def token_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert for token choice: capacity_factor * k * ceil(S / E) (fairseq's top2gating form)."""
  return max(1, int(math.ceil(capacity_factor * top_k * math.ceil(n_tokens / n_experts))))


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float) -> int:
  """Tokens each expert takes under expert choice: capacity_factor * S / E (Zhou et al. 2022, eq. 1)."""
  return max(1, min(n_tokens, int(math.ceil(capacity_factor * n_tokens / n_experts))))


def top_k_choices(probs: jax.Array, top_k: int, *, second_policy: str = "all",
                  rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(expert [S, k], prob [S, k], active [S, k]): each token's k most probable experts (ties go to the
  lower index) and whether each choice is attempted. With 'sampling', choice j >= 1 is attempted with
  probability min(1, k * p_j / sum of the token's top-k probabilities) (GShard: 2 * g2 for top-2);
  without an rng every choice is attempted (evaluation)."""
  prob, expert = jax.lax.top_k(probs, top_k)
  active = jnp.ones(expert.shape, bool)
  if second_policy == "sampling" and top_k > 1 and rng is not None:
    share = prob / jnp.maximum(jnp.sum(prob, axis=-1, keepdims=True), _EPS)
    keep = top_k * share > jax.random.uniform(rng, share.shape)
    active = active & keep.at[:, 0].set(True)
  elif second_policy not in ("all", "sampling"):
    raise ValueError(f"second_policy must be 'all' or 'sampling', got '{second_policy}'")
  return expert.astype(jnp.int32), prob, active


def combine_gates(prob: jax.Array, kept: jax.Array) -> jax.Array:
  """Gates of the kept choices: the raw probability for top-1 (Switch), renormalised over the kept choices
  for top-k >= 2 (GShard / fairseq, normalisation after dropping)."""
  g = jnp.where(kept, prob, 0.0)
  if prob.shape[-1] == 1:
    return g
  return g / jnp.maximum(jnp.sum(g, axis=-1, keepdims=True), _EPS)


def assign_token_choice(probs: jax.Array, top_k: int, capacity: int | None, *, second_policy: str = "all",
                        rng: jax.Array | None = None) -> Assignment:
  """Token-choice routing of one group: probs [S, E] -> Assignment. capacity None = dropless."""
  n_tokens, n_experts = probs.shape
  expert, prob, active = top_k_choices(probs, top_k, second_policy=second_policy, rng=rng)
  # Slots are claimed in rank-major order: all first choices (in token order), then all second choices.
  onehot = jax.nn.one_hot(expert.T, n_experts, dtype=jnp.int32) * active.T[..., None]  # [k, S, E]
  claimed = jnp.cumsum(onehot.reshape(top_k * n_tokens, n_experts), axis=0).reshape(top_k, n_tokens, n_experts)
  position = (jnp.take_along_axis(claimed, expert.T[..., None], axis=-1)[..., 0] - 1).T  # [S, k]
  kept = active if capacity is None else active & (position < capacity)
  return Assignment(expert, combine_gates(prob, kept), active, kept, position.astype(jnp.int32))


def dispatch_from_assignment(a: Assignment, n_experts: int, capacity: int) -> Dispatch:
  """Expert slots [E, C] filled by the kept assignments of one group."""
  n_tokens, top_k = a.expert.shape
  flat = jnp.where(a.kept, a.expert * capacity + a.position, n_experts * capacity)  # out of range = dropped
  tokens = jnp.broadcast_to(jnp.arange(n_tokens, dtype=jnp.int32)[:, None], (n_tokens, top_k))
  slot_token = jnp.full((n_experts * capacity,), n_tokens, jnp.int32).at[flat.ravel()].set(
      tokens.ravel(), mode="drop")
  slot_gate = jnp.zeros((n_experts * capacity,), a.gate.dtype).at[flat.ravel()].set(a.gate.ravel(), mode="drop")
  return Dispatch(slot_token.reshape(n_experts, capacity), slot_gate.reshape(n_experts, capacity))


def assign_expert_choice(probs: jax.Array, capacity: int) -> Dispatch:
  """Expert-choice routing of one group: each expert's `capacity` highest-scoring tokens (ties: lower
  token index first), gated by their softmax scores (Zhou et al. 2022, sec. 3.1)."""
  gate, token = jax.lax.top_k(probs.T, capacity)  # [E, C]
  return Dispatch(token.astype(jnp.int32), gate)
