"""Group relative policy optimisation (GRPO; Shao et al. 2024, arXiv 2402.03300, section 4.1) for the dense LM
on the rollout-capable loop (`Task.rollout`): every step samples `group_size` completions of each prompt from
the current parameters (`common.generate`), scores them with the caller's reward function, normalises the
rewards within each group, and the loss is the clipped-ratio policy gradient plus a KL penalty to a frozen
reference policy.

The definitions follow google-tunix (`tunix/rl/algo_core.py`, `tunix/rl/common.py`), checked on a hand-computed
group in tests/astro/test_grpo.py:
- advantage A_i = (r_i - mean(r)) / (std(r, ddof=1) + 1e-6) over the group;
- per token, with log-ratio d = clip(logp - logp_old, -20, 20) and rho = exp(d):
  max(-A * rho, -A * clip(rho, 1 - epsilon, 1 + epsilon_high)) + beta * KL;
- KL estimators 'kl' (logp - logp_ref), 'mse_kl' (0.5 * (logp - logp_ref)^2), 'low_var_kl'
  (exp(logp_ref - logp) - (logp_ref - logp) - 1, Schulman's k3, the GRPO paper's);
- aggregation 'sequence-mean-token-mean': each completion's loss is the mean over its tokens, the loss the mean
  over completions (the loop divides the summed objective by the weight, the number of completions).
One policy update per rollout, so logp_old is the current log-probability without gradient (tunix with
num_iterations=1): rho is 1 in value and the clip bounds only later iterations.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.generate import generate
from common.tokenizers import Tokenizer

KL_METHODS = ("kl", "mse_kl", "low_var_kl")


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
  group_size: int = 4        # completions per prompt (G)
  epsilon: float = 0.2       # clip range below 1
  epsilon_high: float = 0.2  # clip range above 1
  beta: float = 0.04         # weight of the KL penalty
  kl_method: str = "low_var_kl"
  temperature: float = 1.0   # sampling temperature of the rollouts
  max_new_tokens: int = 64

  def __post_init__(self):
    if self.group_size < 2:
      raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
    if self.kl_method not in KL_METHODS:
      raise ValueError(f"kl_method must be one of {KL_METHODS}, got '{self.kl_method}'")


def group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """[n] rewards of consecutive groups -> their group-normalised advantages (std with ddof=1)."""
  groups = np.asarray(rewards, np.float64).reshape(-1, group_size)
  mean, std = groups.mean(axis=1, keepdims=True), groups.std(axis=1, ddof=1, keepdims=True)
  return ((groups - mean) / (std + 1e-6)).reshape(-1).astype(np.float32)


def kl_estimate(logps: jax.Array, ref_logps: jax.Array, method: str) -> jax.Array:
  if method == "kl":
    return logps - ref_logps
  if method == "mse_kl":
    return 0.5 * jnp.square(logps - ref_logps)
  diff = ref_logps - logps
  return jnp.exp(diff) - diff - 1


def token_logps(model: nnx.Module, batch: dict) -> jax.Array:
  """log p(target | inputs) per position, [rows, length] f32."""
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]


def grpo_loss(model: nnx.Module, batch: dict, settings: GRPOSettings):
  """(summed per-completion losses, number of completions with a token, metric sums) of a rollout batch:
  `inputs targets positions segment_ids` [rows, length], `completion_mask` (1 on completion targets),
  `advantages` [rows], `ref_logps` [rows, length]."""
  logps = token_logps(model, batch)
  mask = batch["completion_mask"].astype(jnp.float32)
  log_ratio = jnp.clip(logps - jax.lax.stop_gradient(logps), -20.0, 20.0)
  ratio = jnp.exp(log_ratio)
  adv = batch["advantages"][:, None]
  per_token = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - settings.epsilon, 1 + settings.epsilon_high))
  kl = kl_estimate(logps, batch["ref_logps"], settings.kl_method)
  tokens = mask.sum(axis=-1)
  seq_mean = lambda x: (x * mask).sum(axis=-1) / jnp.maximum(tokens, 1.0)
  pg, kl_seq = seq_mean(per_token), seq_mean(kl)
  weight = (tokens > 0).sum().astype(jnp.float32)
  nll = seq_mean(-logps)  # of the completions: on reference solutions (ReferenceEval), how well they are learnt
  return jnp.sum(pg + settings.beta * kl_seq), weight, dict(pg_loss=pg.sum(), kl=kl_seq.sum(), nll=nll.sum())


def nll_summary(sums: dict) -> dict:
  """`Task.eval_summary` of a GRPO task: the per-token NLL of the eval completions and their KL to the
  reference, each averaged over completions."""
  return dict(nll=sums["nll"] / sums["weight"], kl=sums["kl"] / sums["weight"])


def rollout_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int
                 ) -> dict[str, np.ndarray]:
  """Prompt + completion per row, right-padded to `seq_len` + 1 tokens: next-token rows with the completion's
  targets in `completion_mask` (a completion cut to fit; a prompt longer than the row is refused)."""
  rows = len(prompts)
  out = {k: np.zeros((rows, seq_len), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
  out["completion_mask"] = np.zeros((rows, seq_len), np.float32)
  for r, (prompt, completion) in enumerate(zip(prompts, completions)):
    if len(prompt) >= seq_len:
      raise ValueError(f"prompt of {len(prompt)} tokens does not fit rows of {seq_len} positions")
    ids = np.asarray(list(prompt) + list(completion), np.int32)[:seq_len + 1]
    n = len(ids) - 1
    out["inputs"][r, :n], out["targets"][r, :n] = ids[:-1], ids[1:]
    out["positions"][r, :n], out["segment_ids"][r, :n] = np.arange(n), 1
    out["completion_mask"][r, len(prompt) - 1:n] = 1.0
  return out


_token_logps = nnx.jit(token_logps)


class ReferenceEval:
  """An eval set for a GRPO task, shaped like its rollout batches: given (prompt, reference completion) pairs
  (e.g. gold solutions of held-out problems) with advantage 0, so eval/loss is beta times the KL to the
  reference policy and `nll_summary` adds their NLL under the policy. `eval_batches(n)` as common.data's."""

  def __init__(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], reference: nnx.Module,
               *, seq_len: int, batch_size: int):
    rows = rollout_rows(prompts, completions, seq_len)
    short = -len(prompts) % batch_size
    rows = {k: np.concatenate([v, np.zeros((short, seq_len), v.dtype)]) for k, v in rows.items()}
    rows["advantages"] = np.zeros(len(rows["inputs"]), np.float32)
    rows["ref_logps"] = np.concatenate([np.asarray(_token_logps(reference, {k: v[i:i + batch_size] for k, v in
                                                                            rows.items()}))
                                        for i in range(0, len(rows["inputs"]), batch_size)])
    self.rows, self.batch_size = rows, batch_size

  def eval_batches(self, max_batches: int = 0):
    n = len(self.rows["inputs"]) // self.batch_size
    for b in range(min(n, max_batches) if max_batches > 0 else n):
      yield {k: v[b * self.batch_size:(b + 1) * self.batch_size] for k, v in self.rows.items()}


def grpo_rollout(*, prompts_at: Callable[[int], list[tuple[list[int], object]]],
                 reward: Callable[[object, str], float], reference: nnx.Module, tokenizer: Tokenizer,
                 settings: GRPOSettings, seq_len: int):
  """`Task.rollout` of GRPO. `prompts_at(step)` gives the step's (prompt ids, payload) pairs (a pure function
  of the step, so resume is exact); `reward(payload, completion text)` scores a completion (e.g. +1 / -1 from
  a verifier); `reference` is the frozen policy of the KL term. The sampling seed comes from the loop's key."""
  stop_ids = tuple(tokenizer.stop_ids)

  def rollout(model: nnx.Module, step: int, key: jax.Array):
    pairs = prompts_at(step)
    g = settings.group_size
    prompts = [ids for ids, _ in pairs for _ in range(g)]
    mesh = jax.sharding.get_mesh()
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    completions = generate(model, prompts, max_new_tokens=settings.max_new_tokens,
                           temperature=settings.temperature, stop_ids=stop_ids, tokenizer=tokenizer, seed=seed,
                           mesh=None if mesh.empty else mesh)
    texts = [tokenizer.decode(c) for c in completions]
    rewards = np.asarray([reward(pairs[i // g][1], t) for i, t in enumerate(texts)], np.float32)
    # a completion that stopped before the budget ended with a stop id: it is trained too
    ended = [list(c) + [stop_ids[0]] if len(c) < settings.max_new_tokens else list(c) for c in completions]
    batch = rollout_rows(prompts, ended, seq_len)
    batch["advantages"] = group_advantages(rewards, g)
    batch["ref_logps"] = np.asarray(_token_logps(reference, batch))
    metrics = dict(reward=float(rewards.mean()), completion_tokens=float(np.mean([len(c) for c in ended])))
    return batch, metrics

  return rollout
