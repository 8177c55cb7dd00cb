"""From the aux dicts sown by the MoE layers of a model to the training objective and its metrics."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from common.nn.moe.layer import pop_moe_aux

SCALARS = ("balance_loss", "z_loss", "router_entropy", "fraction_dropped")
MAX_PER_EXPERT_METRICS = 16  # per-expert load lines are written only for this many experts or fewer


def summarize_aux(auxes: list[dict]) -> dict:
  """Mean over MoE layers (fairseq's `gate_loss_combine_method='average'`) of every statistic."""
  return jax.tree.map(lambda *v: jnp.mean(jnp.stack(v), axis=0), *auxes)


def moe_loss_terms(model, weight: jax.Array) -> tuple[jax.Array, dict]:
  """(objective term, metric sums) for a loss_fn of `common.train`: the layers' weighted auxiliary losses
  (averaged over layers) times `weight`, so that dividing by the total weight gives the per-token objective,
  and each statistic times `weight` (reported as its mean). Pops what the layers sowed; zero and {} for a
  model without MoE layers."""
  auxes = pop_moe_aux(model)
  if not auxes:
    return jnp.zeros((), jnp.float32), {}
  s = summarize_aux(auxes)
  sums = {f"moe/{k}": weight * s[k] for k in SCALARS}
  sums["moe/aux_loss"] = weight * s["aux_loss"]
  load = s["expert_load"]
  sums["moe/max_load_ratio"] = weight * jnp.max(load) * load.shape[0]  # 1 when perfectly balanced
  if load.shape[0] <= MAX_PER_EXPERT_METRICS:
    sums.update({f"moe/load_{e}": weight * load[e] for e in range(load.shape[0])})
  return weight * s["aux_loss"], sums
