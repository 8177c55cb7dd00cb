"""`python -m moma.train_aux_routers --workdir=RUN [--steps=N] [--batch_size=B] [--learning_rate=LR] [--hidden=H]
[--eval_batches=N]`

Trains the auxiliary routers of a finished `moma.train` run (moma/aux_routers.py; Lin et al. 2024, the section on
inference) and measures the causal-inference gap. The run is read-only (`common.train.restore`) and frozen: on
its training batches (from position 0, in the run's data order) the model's own expert-choice and MoD decisions
are the BCE targets of the aux routers, which see only each token's router input. The routers are saved in
RUN/aux_routers/checkpoints (rerunning resumes them; the run's checkpoints are never touched). Then, on the
validation split, the loss of the model routed by expert choice over the batch (teacher-forced) is compared
with the loss of the model routed by the aux routers token by token (causal: `causal`, under the default rule
`aux_routers.DEFAULT_RULE`, named in `rule`; each rule's losses under its name), overall and per target modality,
with the routers' BCE and accuracy against the expert-choice decisions; RUN/aux_routers/result.json holds it.
"""
from __future__ import annotations

import json
import os
import sys

from common.cli import ArgumentParser

DEFAULT_STEPS = 300
DEFAULT_LEARNING_RATE = 3e-3
PARTS = ("overall", "text", "image")


def load_frozen_run(workdir: str):
  """(run config, model with the newest parameters, its step) of a moma.train run; ConfigError naming
  --workdir when it is not one."""
  from common.train.restore import load_run_model, read_run_config
  from moma.model import build_moma_model
  cfg = read_run_config(workdir, "--workdir")
  model, step = load_run_model(workdir, cfg, lambda: build_moma_model(cfg.model, seed=int(cfg.train.seed)),
                               key="--workdir")
  return cfg, model, step


def make_data(cfg, batch_size: int):
  from common.data.mixed_modal import MixedModalData
  from common.recipes import image_tokenizer
  return MixedModalData(cfg.data, batch_size=batch_size, seed=int(cfg.train.seed),
                        image_tokenizer=image_tokenizer.for_data(cfg.data))


def _jnp_batch(batch: dict) -> dict:
  import jax.numpy as jnp
  return {k: jnp.asarray(v) for k, v in batch.items()}


class RoutingTargets:
  """The aux routers' training data: each batch of the run's data, in its order, with the frozen model's own
  routing of it (`aux_routers.routing_targets`): per routed layer i, `input_i` (router inputs), `decision_i`
  (the expert-choice / MoD decisions, the BCE targets) and `mask_i` (the tokens that count)."""

  def __init__(self, model, layers, data):
    import jax
    from flax import nnx
    from moma import aux_routers
    nnx.pop(model, nnx.Intermediate)
    graphdef, self.state = nnx.split(model)
    self.data = data

    def targets(state, batch):
      inputs, decisions, masks = aux_routers.routing_targets(nnx.merge(graphdef, state), layers, batch)
      out = dict(modality=batch["modality"])
      for i, columns in enumerate(zip(inputs, decisions, masks)):
        out.update(zip((f"input_{i}", f"decision_{i}", f"mask_{i}"), columns))
      return out

    self._targets = jax.jit(targets)

  def train_batch(self, position: int) -> dict:
    import jax
    return jax.device_get(self._targets(self.state, _jnp_batch(self.data.train_batch(position))))

  def eval_batches(self, n_batches: int):
    """None: the routers are scored on the validation split by `evaluate`, against the causal model too."""
    return iter(())


def routers_loss(routers, batch: dict):
  """The loop's loss: BCE summed over every routed decision of the real tokens, their count, and the correct
  0.5-threshold predictions (metrics.jsonl: `loss` = mean BCE, `accuracy`)."""
  from moma import aux_routers
  columns = lambda name: [batch[f"{name}_{i}"] for i in range(len(routers.layers))]
  sums = aux_routers.routing_bce(routers, columns("input"), columns("decision"), batch["modality"], columns("mask"))
  return sums["bce"], sums["count"], dict(accuracy=sums["correct"])


def routers_config(steps: int, batch_size: int, learning_rate: float, layers, n_params: int):
  """The loop's config: Adam (no weight decay, no clipping), warmup over a twentieth of the steps, cosine decay
  to a tenth; one checkpoint, at the end; ten log lines. It runs on one device, as the frozen model."""
  import ml_collections
  from common.configs.base import base_config
  cfg = base_config()
  del cfg["data"]  # the data is the frozen run's, which `run` checks (run_step.json)
  cfg.model = ml_collections.ConfigDict(dict(
      name="aux_routers", parameters=n_params,
      layers=[dict(block=l.block, kind=l.kind, columns=l.n_columns) for l in layers]))
  cfg.train.update(steps=steps, batch_size=batch_size, learning_rate=learning_rate, b2=0.999,
                   warmup_steps=max(1, steps // 20), min_learning_rate_ratio=0.1, weight_decay=0.0, grad_clip=0.0)
  cfg.checkpoint.update(every_steps=steps, keep=1, async_save=False)
  cfg.log.every_steps = max(1, steps // 10)
  cfg.eval.every_steps = steps
  return cfg


def train_routers(model, data, routers, *, steps: int, learning_rate: float, out_dir: str) -> list[dict]:
  """Trains `routers` in place on the shared loop (`common.train.loop`; out_dir is its workdir: rerunning
  resumes, SIGTERM saves and exits 143): Adam on the mean BCE over every routed decision of the real tokens
  of each training batch (the run's data order from position 0); the main model only runs forward (frozen).
  Returns the logged rows (step, bce, accuracy)."""
  import jax
  from flax import nnx
  from common.tasks.base import Task
  from common.train.loop import train_to_completion
  from common.train.restore import load_run_model
  graphdef, initial = nnx.split(routers)
  build = lambda: nnx.merge(graphdef, initial)
  history = []
  if steps > 0:
    data = RoutingTargets(model, routers.layers, data)
    batch_size, length = data.train_batch(0)["modality"].shape
    n_params = sum(x.size for x in jax.tree.leaves(initial))
    cfg = routers_config(steps, batch_size, learning_rate, routers.layers, n_params)
    task = Task(build_model=build, loss_fn=routers_loss, data=data, train_flops_per_example=0.0,
                units_per_example=length)
    train_to_completion(cfg, out_dir, task, what="the aux routers", devices=jax.local_devices()[:1])
    trained, _ = load_run_model(out_dir, cfg, build, key="--workdir")
    nnx.update(routers, nnx.state(trained, nnx.Param))
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    history = [dict(step=r["step"], bce=r["loss"], accuracy=r["accuracy"]) for r in rows if "loss" in r]
  return history


def evaluate(model, routers, data, n_batches: int) -> dict:
  """Validation: teacher-forced vs causal loss per part (`causal`: the default rule's), aux BCE/accuracy against
  expert choice, the fraction of tokens MoD layers let through causally, and each rule's losses, overall gap and
  experts per token."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from common.tasks.mixed_modal import per_modality_nll
  from moma import aux_routers

  nnx.pop(model, nnx.Intermediate)
  model_def, model_state = nnx.split(model)
  routers_def, routers_state = nnx.split(routers)

  @jax.jit
  def one(model_state, routers_state, batch):
    model, routers = nnx.merge(model_def, model_state), nnx.merge(routers_def, routers_state)
    inputs, decisions, masks = aux_routers.routing_targets(model, routers.layers, batch)
    out = aux_routers.routing_bce(routers, inputs, decisions, batch["modality"], masks)
    routed = dict(teacher_forced=model(batch["inputs"], batch["positions"], batch["segment_ids"],
                                       batch["modality"]))
    nnx.pop(model, nnx.Intermediate)
    for rule in aux_routers.RULES:
      routed[rule], _, sums = aux_routers.causal_forward(model, routers, batch, rule=rule)
      out.update({f"{rule}/{k}": v for k, v in sums.items()})
    for name, logits in routed.items():
      nll, weight, parts = per_modality_nll(logits, batch)
      out[f"{name}/nll/overall"], out[f"{name}/weight/overall"] = nll, weight
      for part in PARTS[1:]:
        out[f"{name}/nll/{part}"] = parts.get(f"nll/{part}", jnp.zeros(()))
        out[f"{name}/weight/{part}"] = parts.get(f"weight/{part}", jnp.zeros(()))
    return out

  totals: dict[str, float] = {}
  for batch in data.eval_batches(n_batches):
    for k, v in jax.device_get(one(model_state, routers_state, _jnp_batch(batch))).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  mean = lambda name, part: totals[f"{name}/nll/{part}"] / max(totals[f"{name}/weight/{part}"], 1.0)
  rule = aux_routers.DEFAULT_RULE
  result = {name: {part: mean(name, part) for part in PARTS} for name in ("teacher_forced", *aux_routers.RULES)}
  result.update(rule=rule, causal=dict(result[rule]))
  result["gap"] = {p: result["causal"][p] - result["teacher_forced"][p] for p in PARTS}
  count = max(totals["count"], 1.0)
  result.update(bce=totals["bce"] / count, accuracy=totals["correct"] / count, mod_fraction=None)
  if totals[f"{rule}/mod_decisions"] > 0:
    result["mod_fraction"] = totals[f"{rule}/mod_through"] / totals[f"{rule}/mod_decisions"]
  for r in aux_routers.RULES:
    result[f"{r}_gap_overall"] = result[r]["overall"] - result["teacher_forced"]["overall"]
    tokens = totals[f"{r}/expert_tokens"]
    result[f"{r}_experts_per_token"] = totals[f"{r}/experts_used"] / tokens if tokens > 0 else None
  return result


def run(workdir: str, *, steps: int | None = None, batch_size: int = 0, learning_rate: float = DEFAULT_LEARNING_RATE,
        hidden: int = 0, eval_batches: int = 0) -> dict:
  """Trains (or resumes) the aux routers of the run in `workdir`, evaluates them, writes and returns the result."""
  from flax import nnx
  from common.config import ConfigError
  from moma import aux_routers
  steps = DEFAULT_STEPS if steps is None else steps
  cfg, model, run_step = load_frozen_run(workdir)
  batch_size = batch_size or int(cfg.train.batch_size)
  eval_batches = eval_batches or int(cfg.eval.batches)
  data = make_data(cfg, batch_size)
  layers = aux_routers.routed_layers(model)
  if not layers:
    raise ConfigError(f"--workdir: the model of '{workdir}' routes nothing (a dense model): no aux routers to train")
  out_dir = os.path.join(workdir, "aux_routers")
  trained_on = os.path.join(out_dir, "run_step.json")
  if os.path.exists(trained_on):
    with open(trained_on) as f:
      previous = json.load(f)["run_step"]
    if previous != run_step:
      raise ConfigError(f"--workdir: the aux routers in '{out_dir}' were trained on step {previous} of the run, "
                        f"which is now at step {run_step}; move them away to train new ones")
  os.makedirs(out_dir, exist_ok=True)
  with open(trained_on, "w") as f:
    json.dump(dict(run_step=run_step), f)
  hidden = hidden or aux_routers.default_hidden(int(cfg.model.d_model))
  routers = aux_routers.AuxRouters(layers, int(cfg.model.d_model), hidden, rngs=nnx.Rngs(params=int(cfg.train.seed)))
  history = train_routers(model, data, routers, steps=steps, learning_rate=learning_rate, out_dir=out_dir)
  result = evaluate(model, routers, data, eval_batches)
  result.update(run_step=run_step, steps=steps, eval_batches=eval_batches, batch_size=batch_size, hidden=hidden,
                learning_rate=learning_rate, history=history,
                layers=[dict(block=l.block, kind=l.kind, columns=l.n_columns) for l in layers])
  with open(os.path.join(out_dir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def main(argv=None) -> int:
  p = ArgumentParser(prog="python -m moma.train_aux_routers", description=__doc__.split("\n\n")[1])
  p.add_argument("--workdir", required=True, help="a finished moma.train run (read-only)")
  p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
  p.add_argument("--batch_size", type=int, default=0, help="default: the run's train.batch_size")
  p.add_argument("--learning_rate", type=float, default=DEFAULT_LEARNING_RATE)
  p.add_argument("--hidden", type=int, default=0, help="hidden width of each aux router (default d_model / 4)")
  p.add_argument("--eval_batches", type=int, default=0, help="validation batches (default: the run's eval.batches)")
  a = p.parse_args(argv)
  if a.steps < 0 or a.batch_size < 0 or a.hidden < 0 or a.eval_batches < 0 or a.learning_rate <= 0:
    p.error("--steps, --batch_size, --hidden and --eval_batches must be >= 0, --learning_rate > 0")
  result = run(a.workdir, steps=a.steps, batch_size=a.batch_size, learning_rate=a.learning_rate, hidden=a.hidden,
               eval_batches=a.eval_batches)
  print(json.dumps({k: result[k] for k in ("rule", "teacher_forced", "causal", "gap", "bce", "accuracy")}, indent=1))
  return 0


if __name__ == "__main__":
  from common.config import run_main
  run_main(lambda: main(sys.argv[1:]))
