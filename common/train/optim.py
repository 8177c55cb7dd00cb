"""AdamW with linear warmup then cosine (or linear) decay, global-norm clipping, and weight decay on matrices
only."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from common.config import require


SCHEDULES = ("cosine", "linear")


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to `learning_rate` over `warmup_steps`, then `train.schedule`'s decay ('cosine', or
  'linear' as OPT and OPT-IML train) to `learning_rate * min_learning_rate_ratio` at `steps`."""
  kind = train_cfg.get("schedule", "cosine")
  require(kind in SCHEDULES, "train.schedule", f"must be one of {', '.join(SCHEDULES)}, got '{kind}'")
  peak = train_cfg.learning_rate
  warmup = min(train_cfg.warmup_steps, max(train_cfg.steps - 1, 0))
  steps, end = max(train_cfg.steps, warmup + 1), peak * train_cfg.min_learning_rate_ratio
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                              decay_steps=steps, end_value=end)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                               optax.linear_schedule(peak, end, steps - warmup)], [warmup])


# train.moment_dtype: the dtype Adam's first moment is kept in (optax's `mu_dtype`); the second moment follows
# the parameters' dtype (model.param_dtype), as optax keeps it.
MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def decay_mask(params):
  """Decay weight matrices; leave norms' scales and other vectors alone (as in Llama and GPT-3)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Clipping then AdamW. The state has the same tree whether clipping is on or off (`identity` in its place
  holds no state either), so that a run may change train.grad_clip on resume."""
  require(math.isfinite(train_cfg.learning_rate) and train_cfg.learning_rate > 0, "train.learning_rate",
          f"must be positive and finite, got {train_cfg.learning_rate}")
  require(train_cfg.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
  moment_dtype = train_cfg.get("moment_dtype", "float32")
  require(moment_dtype in MOMENT_DTYPES, "train.moment_dtype",
          f"must be one of {sorted(MOMENT_DTYPES)}, got '{moment_dtype}'")
  adamw = optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                      eps=train_cfg.eps, weight_decay=train_cfg.weight_decay, mask=decay_mask,
                      mu_dtype=MOMENT_DTYPES[moment_dtype])
  clip = optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip else optax.identity()
  return optax.chain(clip, adamw)


def only_trainable(optimizer: optax.GradientTransformation, abstract_model: nnx.Module,
                   trainable) -> optax.GradientTransformation:
  """`optimizer` on the parameters that match the nnx filter `trainable` (e.g. LoRA adapters), zero updates
  and no optimizer state (no Adam moments, no weight decay) for every other parameter, which stays
  bit-identical. Gradient clipping still sees the whole gradient; give frozen weights a zero gradient
  (stop_gradient in the loss) so that it sees the trainable part only."""
  trainable_paths = {path for path, _ in jax.tree_util.tree_flatten_with_path(
      nnx.state(abstract_model, trainable))[0]}
  if not trainable_paths:
    raise ValueError("only_trainable: the filter matches no parameter of the model")

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "trainable" if path in trainable_paths else "frozen", params)

  return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)
