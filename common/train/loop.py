"""The training loop every trainer shares: sharded state, resume, steps, eval, checkpoints, metrics.

Contract (../ARCHITECTURE.md): rerunning the same command on the same workdir resumes from the newest
intact checkpoint and ends where an uninterrupted run would (the data position is in the checkpoint); a rerun
that changes the trajectory is refused unless allowed (`common.train.resume`); SIGTERM saves at the current
step (in a multi-process run, every process at the step JAX's preemption sync names) and exits 143; a
non-finite loss, gradient or update stops the run naming the step (or the step is skipped and counted,
`train.nan_policy='skip'`); bad input raises ConfigError before the workdir is touched.

The workdir may be local or any epath URL (gs://...): every file of it goes through `common.train.workdir`.

Every step is traced and run under `jax.set_mesh(mesh)`, so layers and kernels see the one mesh the
command built (MoE experts take the expert-parallel path, Pallas kernels split their rows in shard_map).
A task with a `rollout` (RL, search) makes each step's batch from the current parameters, with randomness
from (train.seed, step) only, so that a resumed run still repeats an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Sequence

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from common import sharding
from common.config import ConfigError, require
from common.flops import peak_flops_per_device
from common.train import resume, workdir as workdir_lib
from common.train.checkpoint import Checkpointer
from common.train.metrics import MetricsWriter, Progress
from common.train.optim import learning_rate_schedule, make_optimizer, only_trainable
from common.train.profiling import RECOMPUTE, Goodput, StepProfiler, parse_window
from common.train.restore import initial_params
from common.tasks.base import Task
from common.train.step import init_state, make_eval_step, make_train_step

EXIT_PREEMPTED = 143
ROLLOUT_STREAM = 0x524F4C4C  # 'ROLL': the rollout keys' branch of the seed


def validate_loop_config(cfg, mesh) -> None:
  t = cfg.train
  require(t.steps > 0, "train.steps", f"must be positive, got {t.steps}")
  require(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
  dp = sharding.data_parallel_size(mesh)
  require(t.batch_size % (dp * t.grad_accum) == 0, "train.batch_size",
          f"{t.batch_size} is not divisible by data-parallel size {dp} x train.grad_accum {t.grad_accum}")
  require(t.nan_policy in ("stop", "skip"), "train.nan_policy", f"must be 'stop' or 'skip', got '{t.nan_policy}'")
  parse_window(cfg.log.get("profile_steps", ""))
  for key in ("checkpoint.every_steps", "checkpoint.keep", "log.every_steps", "eval.every_steps"):
    section, name = key.split(".")
    require(cfg[section][name] > 0, key, f"must be positive, got {cfg[section][name]}")
  require(cfg.log.progress in ("auto", "bar", "lines"), "log.progress", "must be 'auto', 'bar' or 'lines'")


def check_workdir(workdir: str, cfg, allow_config_change: Sequence[str] = ()) -> dict:
  """The checks of a workdir before anything is built or written (`train` runs them; a command line runs
  them before it builds the task's data): it can be written, and a run it holds has the trajectory settings
  of `cfg` or changes `allow_config_change` allows. Returns those changes ({key: (before, after)})."""
  _check_workdir_path(workdir)
  return resume.check_changes(workdir, cfg, allow_config_change)


def check_eval_only(workdir: str, cfg) -> None:
  """`--eval_only` needs parameters: a checkpoint in the workdir or `train.init_from`."""
  if not cfg.train.get("init_from") and not (workdir_lib.run_path(workdir) / "checkpoints").is_dir():
    raise ConfigError(f"--eval_only: '{workdir}' holds no checkpoint and train.init_from is empty: nothing to "
                      "evaluate")


def _check_workdir_path(workdir: str) -> None:
  """A file, or a local folder (or the nearest existing parent of a new one) without write permission. In an
  object store (gs://...) whether the run may write shows at its first write."""
  if not workdir:
    raise ConfigError("--workdir: empty path")
  path = workdir_lib.run_path(workdir)
  try:
    exists = path.exists()
  except Exception as e:  # an object store's client: no network, no credentials, no such bucket
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    raise ConfigError(f"--workdir '{workdir}' cannot be reached ({type(e).__name__}: {reason})") from None
  if exists and not path.is_dir():
    raise ConfigError(f"--workdir '{workdir}' is a file, not a folder")
  if not workdir_lib.is_local(path):
    return
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise ConfigError(f"--workdir '{workdir}': '{existing}' is a file, not a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir '{workdir}': '{existing}' is not writable")


def _check_data(cfg, task: Task) -> None:
  """The task's data against the model, where the data says enough: no training text (an empty file packs
  into rows of end-of-document ids only), or a model vocabulary smaller than the data's (ids past the
  embedding, NaN later)."""
  if getattr(task.data, "train_bytes", None) == 0:
    data_cfg = cfg.get("data", {})
    key = "data.path" if data_cfg.get("source") == "files" else "data.source"
    raise ConfigError(f"config key '{key}': '{data_cfg.get(key.split('.')[1])}' gives no training text "
                      "(an empty file?)")
  data_vocab = getattr(task.data, "vocab_size", None)
  model_vocab = cfg.get("model", {}).get("vocab_size")
  if isinstance(data_vocab, int) and isinstance(model_vocab, int) and 0 < model_vocab < data_vocab:
    raise ConfigError(f"config key 'model.vocab_size': {model_vocab} is smaller than the data's vocabulary "
                      f"({data_vocab} ids); set at least {data_vocab}, or 0 for the data's")


class _Preemption:
  """Whether to save and stop after a step, asked after every step. With jax.distributed initialised (any
  multi-process run), JAX's preemption sync manager (started by `jax.distributed.initialize`) catches SIGTERM
  and tells every process the same step to stop at (`reached_preemption_sync_point`, one step past the
  furthest any process has reached when the notice arrives): no collective runs per step, and all processes
  enter the collective checkpoint save together instead of one of them entering the next training step.
  Alone, SIGTERM sets a flag, read after the step it arrives in."""

  def __init__(self):
    self.requested = False
    self.synced = jax.distributed.is_initialized()
    self._old = None if self.synced else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def reached(self, step: int) -> bool:
    if not self.synced:
      return self.requested
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step)

  def restore(self):
    if not self.synced:
      signal.signal(signal.SIGTERM, self._old)


def _to_global(batch: dict, shardings: dict, global_rows: int = 0) -> dict:
  """A batch onto the mesh: host numpy arrays become sharded global arrays, either from the same global batch
  on every process or (`global_rows` > 0) from each process's own rows of a batch of `global_rows`; device
  arrays (a jitted rollout's output) are resharded."""
  def put(v, s):
    if isinstance(v, jax.Array):
      return jax.device_put(v, s)
    if global_rows:
      return jax.make_array_from_process_local_data(s, v, (global_rows, *v.shape[1:]))
    return jax.make_array_from_callback(v.shape, s, lambda idx: v[idx])
  return {k: put(v, shardings[k]) for k, v in batch.items()}


def process_local_rows(data, batch_sharding, batch_size: int) -> int:
  """`batch_size` when the data gives this process only its own rows of each batch (`data.process_rows`, a
  slice: per-host input), else 0 (every process holds the whole batch). Those rows must be the ones this
  process's devices hold on the mesh, or the batch would be assembled wrongly."""
  rows = getattr(data, "process_rows", None)
  if rows is None or (rows.start, rows.stop) == (0, batch_size):
    return 0
  held = [idx[0] for idx in batch_sharding.addressable_devices_indices_map((batch_size, 1)).values()]
  lo, hi = min(s.start or 0 for s in held), max(batch_size if s.stop is None else s.stop for s in held)
  require((lo, hi) == (rows.start, rows.stop), "data.shards",
          f"process {jax.process_index()} reads rows {rows.start}..{rows.stop} of each batch but its devices hold "
          f"rows {lo}..{hi} on this mesh; put the batch axes (data, fsdp) across processes or set data.shards=1")
  return batch_size


def rollout_key(seed: int, step: int) -> jax.Array:
  """The key of step `step`'s rollout: a function of (seed, step) alone, and apart from the stream the train
  step folds from the seed (stochastic layers), so that a resumed run draws the same rollouts."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ROLLOUT_STREAM), step)


def evaluate(eval_fn, params, data, n_batches: int, batch_shardings: dict, summary) -> dict:
  sums: dict[str, float] = {}
  for batch in data.eval_batches(n_batches):
    total, weight, extra = jax.device_get(eval_fn(params, _to_global(batch, batch_shardings)))
    for k, v in {"loss": total, "weight": weight, **extra}.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  if not sums or sums["weight"] == 0:
    return {}
  out = {"loss": sums["loss"] / sums["weight"]}
  out["perplexity"] = math.exp(min(out["loss"], 50.0))
  if summary is not None:
    out.update(summary(sums))
  return {f"eval/{k}": v for k, v in out.items()}


def _log_samples(workdir: str, step: int, samples: dict[str, str], progress, lead: bool) -> None:
  """Appends `step`'s samples to DIR/samples.txt and shows them (escaped, one line each) in the log."""
  if not lead:
    return
  workdir_lib.append_text(workdir_lib.run_path(workdir) / "samples.txt", "".join(
      f"=== step {step} | prompt {prompt!r}\n{prompt}{text}\n" for prompt, text in samples.items()))
  for prompt, text in samples.items():
    progress.message(f"step {step} sample: {(prompt + text)[:160]!r}")


def train_state_shardings(abstract_state: dict, param_shardings, optimizer, mesh) -> dict:
  """Shardings of the training state: every parameter-shaped leaf of the optimizer state (Adam's moments)
  sharded exactly like its parameter, everything else (step, counts) replicated."""
  replicated = sharding.replicated(mesh)
  def like_param(leaf, param_sharding):
    """A frozen parameter's place (only_trainable) holds no state, an empty MaskedNode: it stays one."""
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    return leaf if isinstance(value, optax.MaskedNode) else param_sharding

  opt_shardings = optax.tree_map_params(optimizer, like_param, abstract_state["opt_state"], param_shardings,
                                        transform_non_params=lambda _: replicated,
                                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {**{k: replicated for k in abstract_state}, "params": param_shardings, "opt_state": opt_shardings}


def train_state_init(task: Task, optimizer, mesh) -> tuple[Any, Any, dict, Any]:
  """(graphdef, parameter shardings, state shardings, init): `init()` builds the parameters and the
  optimizer state directly into their shardings on `mesh` (one jit; `init.lower().compile()` plans it
  without allocating)."""
  graphdef, abstract_params = nnx.split(nnx.eval_shape(task.build_model), nnx.Param)
  param_shardings = sharding.state_shardings(abstract_params, mesh)
  abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params)
  state_shardings = train_state_shardings(abstract_state, param_shardings, optimizer, mesh)
  init = jax.jit(lambda: init_state(nnx.split(task.build_model(), nnx.Param)[1], optimizer),
                 out_shardings=state_shardings)
  return graphdef, param_shardings, state_shardings, init


def init_train_state(task: Task, optimizer, mesh) -> tuple[Any, Any, dict]:
  """(graphdef, parameter shardings, state) with every leaf in its sharding on `mesh`."""
  graphdef, param_shardings, _, init = train_state_init(task, optimizer, mesh)
  return graphdef, param_shardings, init()


def train(cfg, workdir: str, task: Task, *, mesh: Mesh | None = None, devices=None,
          allow_config_change: Sequence[str] = (), eval_only: bool = False) -> int:
  """Runs (or resumes) training to cfg.train.steps; returns the process exit status. `mesh` is the command's
  mesh (`common.train.__main__` builds it once from mesh.shape/mesh.axes); without one it is built from
  those keys on `devices` (default: all of jax.devices()). A rerun may change only the keys of
  `common.train.resume.FREE_KEYS` and those in `allow_config_change`. A new run starts from the parameters of
  `train.init_from` (a run folder or a hub entry) with a fresh optimizer when it is set. `eval_only`: evaluate
  the newest checkpoint (or `train.init_from`) once, write DIR/eval/step_N.json, train nothing."""
  goodput = Goodput()
  if mesh is None:
    mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes, devices, cfg.mesh.get("dcn_shape", ()))
  validate_loop_config(cfg, mesh)
  changes = check_workdir(workdir, cfg, allow_config_change)
  _check_data(cfg, task)
  lead = jax.process_index() == 0
  t = cfg.train
  profile_window = parse_window(cfg.log.get("profile_steps", ""))
  run_dir = workdir_lib.run_path(workdir)
  if eval_only:
    check_eval_only(workdir, cfg)

  optimizer, schedule = make_optimizer(t), learning_rate_schedule(t)
  if task.trainable is not None:
    optimizer = only_trainable(optimizer, nnx.eval_shape(task.build_model), task.trainable)
  graphdef, param_shardings, state_shardings, init = train_state_init(task, optimizer, mesh)
  abstract_state = jax.eval_shape(init)  # shapes with the shardings `init` places them in
  n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))

  run_dir.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                      async_save=cfg.checkpoint.async_save)
  data_position = 0
  with goodput.overhead():
    restored = ckpt.restore_latest(abstract_state)
    if restored is None:
      state, origin = init(), "a fresh initialisation"
      if t.get("init_from"):
        params, origin = initial_params(t.init_from, abstract_state["params"], mesh)
        state = {**state, "params": params}
        print(f"parameters from {origin}, a fresh optimizer", flush=True)
    else:
      step0, state, meta = restored
      data_position, origin = int(meta["data_position"]), f"{ckpt.directory}/{step0}"
      print(f"resumed from {origin} (data position {data_position})", flush=True)
      for key, (before, after) in changes.items():
        print(f"config change allowed: {key} {before!r} -> {after!r} from step {step0 + 1}", flush=True)
  if eval_only:
    ckpt.close()
    return _evaluate_only(cfg, run_dir, task, graphdef, param_shardings, state, mesh, origin)
  if lead:
    record = resume.config_record(workdir, cfg, changes, 0 if restored is None else step0)
    workdir_lib.write_atomic(run_dir / "config.json", record)
  start = int(jax.device_get(state["step"]))

  def next_batch(step: int, params) -> tuple[dict, dict]:
    """(batch of `step`, the rollout's metrics): from the data position, or rolled out from `params`."""
    if task.rollout is None:
      return task.data.train_batch(data_position), {}
    return task.rollout(nnx.merge(graphdef, params), step, rollout_key(t.seed, step))

  with jax.set_mesh(mesh):
    pending = next_batch(start, state["params"])  # also the first step's batch
  batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in pending[0].items()}
  local_rows = 0 if task.rollout is not None else process_local_rows(
      task.data, next(iter(batch_shardings.values())), t.batch_size)
  step_fn = jax.jit(make_train_step(graphdef, task.loss_fn, optimizer, schedule, t.grad_accum, seed=t.seed),
                    in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, None),
                    donate_argnums=0)
  eval_fn = jax.jit(make_eval_step(graphdef, task.loss_fn), in_shardings=(param_shardings, batch_shardings))

  n_dev = mesh.size
  peak = peak_flops_per_device(dtype=cfg.model.get("dtype", "float32"))
  flops_per_step = task.train_flops_per_example * t.batch_size
  units_per_step = task.units_per_example * t.batch_size
  writer = MetricsWriter(workdir, resume_step=start, enabled=lead)
  profiler = StepProfiler(profile_window, str(run_dir / "profile"))
  recompute = RECOMPUTE.get(str(cfg.get("model", {}).get("remat", "none")), 1.0)
  progress = Progress(t.steps, start, cfg.log.progress, enabled=lead)
  t_compile = time.time()
  with jax.set_mesh(mesh), goodput.overhead():
    compiled = step_fn.lower(state, _to_global(pending[0], batch_shardings, local_rows)).compile()
  progress.message(
      f"{n_params / 1e6:.2f} M parameters | mesh {dict(mesh.shape)} on {n_dev} {mesh.devices.flat[0].platform} "
      f"device(s) | {flops_per_step / 1e9:.1f} GFLOP/step | compiled in {time.time() - t_compile:.1f}s | "
      f"steps {start}..{t.steps}")

  preemption = _Preemption()
  exit_code = 0
  step = start
  tick, tick_step = time.time(), start

  def save(step_now: int) -> None:
    with goodput.overhead():
      writer.flush()  # the metrics lines up to step_now before the checkpoint that resumes after them
      ckpt.save(step_now, state, {"step": step_now, "data_position": data_position})

  try:
    while step < t.steps:
      with jax.set_mesh(mesh):
        batch, rollout_metrics = pending or next_batch(step, state["params"])
        pending = None
        profiler.before(step + 1)
        state, metrics = compiled(state, _to_global(batch, batch_shardings, local_rows))
      step += 1
      profiler.after(step, metrics)
      data_position += t.batch_size
      last = step == t.steps
      stop = preemption.reached(step)
      if step % cfg.log.every_steps == 0 or last or step % cfg.checkpoint.every_steps == 0 \
          or stop:
        metrics, bad = jax.device_get((metrics, state["first_bad_step"]))
        if bad >= 0 and t.nan_policy == "stop":
          raise FloatingPointError(
              f"non-finite loss, gradient or update at step {int(bad) + 1}; stopping. Parameters were not updated by "
              f"it; the last good checkpoint is step {max(ckpt.steps(), default=0)} in {ckpt.directory}")
        if step % cfg.log.every_steps == 0 or last:
          now = time.time()
          dt = (now - tick) / max(step - tick_step, 1)
          tick, tick_step = now, step
          row = {k: float(v) for k, v in metrics.items() if k not in ("finite", "weight")}
          row.update({k: float(v) for k, v in jax.device_get(rollout_metrics).items()})
          row[task.throughput_key] = units_per_step / dt
          row["mfu"] = flops_per_step / dt / (peak * n_dev)
          row["hfu"] = row["mfu"] * recompute  # hardware FLOPs: remat's recomputation counted too
          row["goodput"] = goodput.fraction()
          row["step_time"] = dt
          writer.write(step, row)
          progress.update(step, row, task.throughput_key)
      if step % cfg.eval.every_steps == 0 or last:
        if task.data is not None:
          with jax.set_mesh(mesh), goodput.overhead():
            ev = evaluate(eval_fn, state["params"], task.data, cfg.eval.batches, batch_shardings, task.eval_summary)
          if ev:
            writer.write(step, ev)
            progress.message(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if task.eval_samples is not None:
          _log_samples(workdir, step, task.eval_samples(nnx.merge(graphdef, state["params"])), progress, lead)
        tick = time.time()  # eval time is not training time
      if step % cfg.checkpoint.every_steps == 0 or last:
        save(step)
      if stop and not last:
        save(step)
        progress.message(f"SIGTERM: saved a checkpoint at step {step}; exiting with status {EXIT_PREEMPTED}")
        exit_code = EXIT_PREEMPTED
        break
  except FloatingPointError as e:
    progress.message(f"error: {e}")
    exit_code = 1
  finally:
    profiler.close()
    ckpt.close()
    writer.close()
    progress.close()
    preemption.restore()
  return exit_code


def _evaluate_only(cfg, run_dir, task: Task, graphdef, param_shardings, state: dict, mesh, origin: str) -> int:
  """`--eval_only`: the eval metrics of `state`'s parameters over eval.batches batches, printed and written to
  DIR/eval/step_N.json (N: the checkpoint's step, 0 for train.init_from); nothing else in DIR changes."""
  if task.data is None or not hasattr(task.data, "eval_batches"):
    raise ConfigError("--eval_only: this task has no evaluation data")
  sample = next(iter(task.data.eval_batches(1)))
  shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in sample.items()}
  eval_fn = jax.jit(make_eval_step(graphdef, task.loss_fn), in_shardings=(param_shardings, shardings))
  with jax.set_mesh(mesh):
    ev = evaluate(eval_fn, state["params"], task.data, cfg.eval.batches, shardings, task.eval_summary)
  step = int(jax.device_get(state["step"]))
  record = {"step": step, "parameters": origin, "batches": int(cfg.eval.batches), **ev}
  print("eval only, " + origin + ": " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items()), flush=True)
  if jax.process_index() == 0:
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    workdir_lib.write_atomic(run_dir / "eval" / f"step_{step}.json", json.dumps(record, indent=1) + "\n")
  return 0


def train_to_completion(cfg, workdir: str, task: Task, *, what: str, **kwargs) -> None:
  """`train` for a caller that needs the finished run (an artefact, a frozen component): SIGTERM still exits
  with status 143, the run saved for the next start to resume; any other stop is a RuntimeError naming
  `what` and the workdir."""
  code = train(cfg, workdir, task, **kwargs)
  if code == EXIT_PREEMPTED:
    raise SystemExit(code)
  if code != 0:
    raise RuntimeError(f"training {what} into '{workdir}' stopped with status {code}")
