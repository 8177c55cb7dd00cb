"""The jit-compiled training and evaluation steps, generic over models and losses.

A task supplies `loss_fn(model, batch) -> (objective_sum, weight, metric_sums)`: the objective summed over
its tokens (auxiliary losses folded in, scaled by `weight`), the number of tokens it covers, and other
per-token sums to report. Dividing by the total weight only at the end makes gradient accumulation over
micro-batches exactly equal to one big batch.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from common.nn.training_rng import training_rng
from common.tasks.base import LossFn


def init_state(params, optimizer: optax.GradientTransformation) -> dict[str, Any]:
  """The whole training state: one pytree, saved and restored as is."""
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
              first_bad_step=jnp.full((), -1, jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))


def all_finite(tree) -> jax.Array:
  """Whether every floating-point element of `tree` is finite (integer leaves, such as counts, always are)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def _split_micro(batch: dict, accum: int) -> dict:
  """[batch, ...] -> [accum, batch/accum, ...], micro-batch j taking rows j, j+accum, ... so that every
  device holds an equal share of each micro-batch."""
  return jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(graphdef, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum: int = 1, seed: int | None = None) -> Callable:
  """(state, batch) -> (state, metrics). A step whose loss, gradient, update, new parameters or new optimizer
  state is not finite (as `optax.apply_if_finite` judges, and past it: a finite gradient times an overflowing
  learning rate) leaves parameters and optimizer state untouched, counts itself in `skipped_steps` and
  records its index in `first_bad_step` (the loop stops or skips on it). The learning rate reported is the one
  the optimizer applied: its schedule advances with applied updates (step - skipped_steps), not with steps.
  With `seed`, stochastic layers (MoE router noise, second-expert sampling) draw from a key folded from the
  seed, the step number and the micro-batch index, so a resumed run repeats an uninterrupted one exactly."""

  def objective(params, batch, key):
    with training_rng(key):
      total, weight, sums = loss_fn(nnx.merge(graphdef, params), batch)
    return total, (weight, sums)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    step_key = None if seed is None else jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
    micro_key = lambda j: None if step_key is None else jax.random.fold_in(step_key, j)
    if grad_accum == 1:
      (total, (weight, sums)), grads = grad_fn(params, batch, micro_key(0))
    else:
      micro = _split_micro(batch, grad_accum)

      def body(carry, j_mb):
        j, mb = j_mb
        (t, (w, s)), g = grad_fn(params, mb, micro_key(j))
        return jax.tree.map(jnp.add, carry, (t, w, s, g)), None

      (t0, (w0, s0)), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), micro_key(0))
      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (t0, w0, s0, g0))
      (total, weight, sums, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
    denom = jnp.maximum(weight, 1.0)
    # In the parameters' dtype (a no-op for f32), so that Adam's second moment keeps model.param_dtype.
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    loss = total / denom
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(updates) & all_finite(new_params)
              & all_finite(opt_state))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    bad = jnp.where(finite | (state["first_bad_step"] >= 0), state["first_bad_step"], state["step"])
    skipped = state["skipped_steps"] + jnp.where(finite, 0, 1).astype(jnp.int32)
    new_state = dict(step=state["step"] + 1, params=keep(new_params, params),
                     opt_state=keep(opt_state, state["opt_state"]), first_bad_step=bad, skipped_steps=skipped)
    metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state["step"] - state["skipped_steps"]),
                   skipped_steps=skipped, finite=finite, weight=weight, **{k: v / denom for k, v in sums.items()})
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, loss_fn: LossFn) -> Callable:
  """(params, batch) -> (objective_sum, weight, metric_sums), to be summed over the eval set."""

  def eval_step(params, batch):
    return loss_fn(nnx.merge(graphdef, params), batch)

  return eval_step
