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
  * The second choice of a top-2 token (`second_policy`, in training; evaluation always takes the top k):
    `'all'`: the second most probable expert, always. `'sampling'` (fairseq's default): WHICH expert is
    second is drawn by Gumbel-max over the logits with the first choice removed, i.e. in proportion to the
    probabilities of the rest; its gate is still its noise-free probability (fairseq draws the noise in
    evaluation too; here evaluation is deterministic). `'random'` (GShard sec. 2.2, whose normalised g2
    fairseq's 'random' replaces by the raw one): the second most probable expert, kept with probability
    `2 * g2 / (g1 + g2)`; a sampled-out choice claims no capacity. For k > 2 both rules extend to every
    choice after the first.
Expert choice (Zhou et al. 2022, arXiv 2202.09368, sec. 3.1): each expert takes its top
`ceil(capacity_factor * S / E)` tokens by softmax score; a token may be taken by several experts or none.

Padding (fairseq's `input_mask`): with a token mask (True = real token) a padded token attempts no
assignment, claims no slot and is never picked by an expert; capacities stay functions of the group size S.

Both capacity-based routings produce a `Dispatch`: for each expert slot the token that fills it (S = empty)
and its gate; dropless routing produces the plain (expert, gate) assignment of every token.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_EPS = 1e-9
SECOND_POLICIES = ("all", "sampling", "random")


class Dispatch(NamedTuple):
  """Slots of a capacity-bounded routing of one group of S tokens."""
  slot_token: jax.Array  # [E, C] int32: token in each slot; S marks an empty slot
  slot_gate: jax.Array   # [E, C] f32: its combine weight (0 for an empty slot)


class Assignment(NamedTuple):
  """Token-choice decisions of one group (before any execution)."""
  expert: jax.Array    # [S, k] int32, the chosen experts in rank order
  gate: jax.Array      # [S, k] f32 combine weights (0 where dropped or sampled out)
  active: jax.Array    # [S, k] bool: the assignment is attempted (a real token's, not sampled out)
  kept: jax.Array      # [S, k] bool: the assignment is executed (attempted and within capacity)
  position: jax.Array  # [S, k] int32: its slot in the expert's buffer (meaningful where kept)


def token_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert for token choice: capacity_factor * k * ceil(S / E) (fairseq's top2gating form)."""
  return max(1, int(math.ceil(capacity_factor * top_k * math.ceil(n_tokens / n_experts))))


def eval_capacity(n_tokens: int, token_fraction: float) -> int | None:
  """Slots per expert for token choice at evaluation: ceil(f * S) (fairseq's
  `--moe-eval-capacity-token-fraction`); f <= 0: None, no capacity (dropless, so a token's output does not
  depend on the other tokens of its group)."""
  return max(1, int(math.ceil(token_fraction * n_tokens))) if token_fraction > 0 else None


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float) -> int:
  """Tokens each expert takes under expert choice: capacity_factor * S / E (Zhou et al. 2022, eq. 1)."""
  return max(1, min(n_tokens, int(math.ceil(capacity_factor * n_tokens / n_experts))))


def top_k_choices(probs: jax.Array, top_k: int, *, second_policy: str = "all",
                  rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(expert [S, k], prob [S, k], active [S, k]): each token's choices and whether each is attempted. The
  first choice is the most probable expert (ties go to the lower index); without an rng (evaluation) or with
  'all', choices j >= 1 are the next most probable ones, all attempted. With an rng:
    'sampling': choices j >= 1 are the top k-1 of log p + Gumbel noise (`jax.random.gumbel(rng, [S, E])`) over
      the experts other than the first choice: Gumbel-max sampling without replacement in proportion to
      their probabilities (log p is the logits up to a per-token constant, so the argmax is fairseq's);
    'random': choice j >= 1 is attempted with probability min(1, k * p_j / sum of the token's top-k
      probabilities) (GShard: 2 * g2 for top-2).
  `prob` is the noise-free probability of each chosen expert."""
  if second_policy not in SECOND_POLICIES:
    raise ValueError(f"second_policy must be one of {SECOND_POLICIES}, got '{second_policy}'")
  prob, expert = jax.lax.top_k(probs, top_k)
  active = jnp.ones(expert.shape, bool)
  if top_k > 1 and rng is not None and second_policy == "sampling":
    gumbel = jax.random.gumbel(rng, probs.shape, probs.dtype)
    noisy = jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny)) + gumbel
    noisy = jnp.where(jnp.arange(probs.shape[-1]) == expert[:, :1], -jnp.inf, noisy)
    expert = jnp.concatenate([expert[:, :1], jax.lax.top_k(noisy, top_k - 1)[1]], axis=1)
    prob = jnp.take_along_axis(probs, expert, axis=1)
  elif top_k > 1 and rng is not None and second_policy == "random":
    share = prob / jnp.maximum(jnp.sum(prob, axis=-1, keepdims=True), _EPS)
    keep = top_k * share > jax.random.uniform(rng, share.shape)
    active = active & keep.at[:, 0].set(True)
  return expert.astype(jnp.int32), prob, active


def combine_gates(prob: jax.Array, kept: jax.Array) -> jax.Array:
  """Gates of the kept choices: the raw probability for top-1 (Switch), renormalised over the kept choices
  for top-k >= 2 (GShard / fairseq, normalisation after dropping)."""
  g = jnp.where(kept, prob, 0.0)
  if prob.shape[-1] == 1:
    return g
  return g / jnp.maximum(jnp.sum(g, axis=-1, keepdims=True), _EPS)


def assign_token_choice(probs: jax.Array, top_k: int, capacity: int | None, *, second_policy: str = "all",
                        rng: jax.Array | None = None, mask: jax.Array | None = None) -> Assignment:
  """Token-choice routing of one group: probs [S, E] -> Assignment. capacity None = dropless. mask [S] bool
  (True = real token): the choices of padded tokens are not attempted (gate 0, no slot)."""
  n_tokens, n_experts = probs.shape
  expert, prob, active = top_k_choices(probs, top_k, second_policy=second_policy, rng=rng)
  if mask is not None:
    active = active & mask[:, None]
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


def assign_expert_choice(probs: jax.Array, capacity: int, mask: jax.Array | None = None) -> Dispatch:
  """Expert-choice routing of one group: each expert's `capacity` highest-scoring tokens (ties: lower
  token index first), gated by their softmax scores (Zhou et al. 2022, sec. 3.1). mask [S] bool (True = real
  token): padded tokens are never picked; a slot left without a real token is empty (token S, gate 0)."""
  n_tokens = probs.shape[0]
  if mask is None:
    gate, token = jax.lax.top_k(probs.T, capacity)  # [E, C]
    return Dispatch(token.astype(jnp.int32), gate)
  gate, token = jax.lax.top_k(jnp.where(mask[None, :], probs.T, -jnp.inf), capacity)
  real = mask[token]
  return Dispatch(jnp.where(real, token, n_tokens).astype(jnp.int32), jnp.where(real, gate, 0.0))
