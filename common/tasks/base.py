"""What a model + data + loss is, as the training loop sees it: the `Task` interface. Task factories
(`common.tasks.lm`, `mixed_modal`, `vq`, `sft`, and each paper's `train.py`) build one; `common.train.loop`
knows nothing else about them."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

# (model, batch) -> (summed objective, weight, {metric: summed value}); see common.train.step.
LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class Task:
  """What a paper package hands the loop."""
  build_model: Callable[[], nnx.Module]  # deterministic in cfg.train.seed
  loss_fn: LossFn
  # .train_batch(position) -> dict of [batch, ...] arrays; .eval_batches(n) -> iterator of such batches.
  # None for a task whose batches all come from `rollout` and that has no eval set.
  data: Any
  train_flops_per_example: float  # analytic training FLOPs of one batch row (common.flops)
  units_per_example: int  # tokens (or bytes) in one batch row, for the throughput figure
  throughput_key: str = "tokens_per_sec"
  # Summed eval metrics {'loss': nats sum, 'weight': tokens, ...} -> reported values (without 'eval/').
  eval_summary: Callable[[dict], dict] | None = None
  # model -> {prompt: generated text}, run at every eval (on every process: the model is sharded), written
  # to DIR/samples.txt and shown in the log, so a run can be read as well as plotted.
  eval_samples: Callable[[nnx.Module], dict[str, str]] | None = None
  # nnx filter of the parameters the optimizer updates (None: all); the others get no optimizer state and
  # stay bit-identical (LoRA: common.nn.lora.LoRAParam).
  trainable: Any = None
  # (model with the current parameters, step, key) -> (batch, metrics): the batch of `step` made from the
  # model itself (RL rollouts, search), used instead of data.train_batch. `key` depends on (train.seed, step)
  # alone (common.train.loop.rollout_key), so a resumed run rolls out what an uninterrupted one did; the
  # metrics (scalars, e.g. the mean reward) go into the step's metrics.jsonl line. Called on every process,
  # under the run's mesh; the batch (numpy or jax arrays) has the same shapes at every step.
  rollout: Callable[[nnx.Module, int, jax.Array], tuple[dict, dict]] | None = None
