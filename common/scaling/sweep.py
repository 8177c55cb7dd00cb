"""`python -m common.scaling.sweep --family=MOD:FN --budgets=1e13,3e13 [--sizes=32,64] --out=DIR`

Runs an IsoFLOP grid (budget.py) locally, one workdir per run under DIR/runs/, then writes the results table,
fits and plots (report.py). It is resumable at two levels: a finished run (its metrics.jsonl holds its last
step and its checkpoints hold the final one) is skipped, and an unfinished one is handed to the trainer, which
resumes from its newest checkpoint (the trainer's own contract). `--emit_commands` instead prints one trainer
command per run for a cluster scheduler (and prepares the workdirs so that `report` can read them later).

`--config.KEY=VALUE` sets a key of every run's config before planning; `--help` lists the other flags.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time
from typing import Callable, Sequence

from common.cli import ArgumentParser
from common.config import ConfigError, run_main
from common.scaling import budget as budget_lib
from common.scaling import commands, families

RUN_INFO = "scaling.json"   # in each run's workdir: what the planner intended (family, size, budget, ...)
SWEEP_INFO = "sweep.json"   # in the sweep folder: the plan and the (budget, size) pairs left out
DEFAULT_TASK = "common.tasks.lm:lm_task"


@dataclasses.dataclass
class SweepResult:
  trained: list[str]
  skipped: list[str]
  failed: list[str]
  dropped: list[str]
  exit_code: int = 0


def run_dir(out: str, run: budget_lib.PlannedRun) -> str:
  return os.path.join(out, "runs", run.name)


def is_finished(workdir: str, steps: int) -> bool:
  """Finished = metrics.jsonl has the train line of the last step and the final checkpoint exists."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
    return False
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return any(r.get("step") == steps and "loss" in r for r in map(json.loads, filter(str.strip, f)))
  except (OSError, ValueError):
    return False


def write_plan(out: str, plan: budget_lib.Plan) -> None:
  """DIR/sweep.json and each run's DIR/runs/NAME/scaling.json (tmp + rename: readers never see half)."""
  def dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
  for run in plan.runs:
    info = {k: getattr(run, k) for k in ("family", "size", "budget", "steps", "flops", "tokens",
                                         "params_total", "params_non_embedding")}
    dump(os.path.join(run_dir(out, run), RUN_INFO), dict(info, name=run.name))
  dump(os.path.join(out, SWEEP_INFO), {"runs": [r.name for r in plan.runs], "dropped": plan.dropped})


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def resolve_callable(spec: str, flag: str) -> Callable:
  module_name, sep, fn_name = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module_name), fn_name) if sep else None
  except ImportError as e:
    raise ConfigError(f"--{flag}: cannot import '{module_name}' ({e})") from None
  if not callable(fn):
    raise ConfigError(f"--{flag}: expected 'module:function' naming a function, got '{spec}'")
  return fn


def run_sweep(plan: budget_lib.Plan, out: str, *, task_fn: Callable | None = None, devices=None,
              log: Callable[[str], None] | None = None) -> SweepResult:
  """Trains every unfinished run of `plan` in this process, in order of budget then size.

  Progress is one line per run: its index, elapsed time and an ETA that assumes the remaining runs cost the
  seconds per FLOP measured so far in this invocation (compile time included, so early ETAs run high)."""
  from common.train.loop import EXIT_PREEMPTED, train  # local: planning and emitting need no JAX
  if task_fn is None:
    task_fn = resolve_callable(DEFAULT_TASK, "task")
  log = log or (lambda line: print(line, flush=True))
  write_plan(out, plan)
  result = SweepResult([], [], [], list(plan.dropped))
  for line in plan.dropped:
    log(f"[sweep] dropped: {line}")
  todo = [r.name for r in plan.runs if not is_finished(run_dir(out, r), r.steps)]
  flops_of = {r.name: r.flops for r in plan.runs}
  start, flops_done = time.time(), 0.0
  for i, run in enumerate(plan.runs, 1):
    workdir = run_dir(out, run)
    head = f"[sweep] run {i}/{len(plan.runs)} {run.name}"
    if run.name not in todo:
      result.skipped.append(run.name)
      log(f"{head}: finished earlier, skipped")
      continue
    elapsed = time.time() - start
    remaining = sum(flops_of[n] for n in todo[todo.index(run.name):])
    eta = f"ETA {_duration(elapsed / flops_done * remaining)}" if flops_done else "ETA after the first run"
    log(f"{head}: {run.steps} steps, {run.flops:.3g} FLOPs, {run.tokens:,} tokens | "
        f"elapsed {_duration(elapsed)} | {eta}")
    cfg = run.config.copy_and_resolve_references()
    code = train(cfg, workdir, task_fn(cfg), devices=devices)
    flops_done += run.flops
    if code == EXIT_PREEMPTED:
      log(f"[sweep] preempted during {run.name}; rerun the same command to resume")
      result.exit_code = code
      return result
    if code != 0 or not is_finished(workdir, run.steps):
      result.failed.append(run.name)
      log(f"[sweep] run {run.name} failed (exit status {code}); see {workdir}")
      continue
    result.trained.append(run.name)
  log(f"[sweep] done in {_duration(time.time() - start)}: {len(result.trained)} trained, "
      f"{len(result.skipped)} skipped, {len(result.failed)} failed, {len(result.dropped)} dropped")
  result.exit_code = 1 if result.failed else 0
  return result


def emit_commands(plan: budget_lib.Plan, out: str, *, trainer: str = "common.train") -> list[str]:
  """One trainer command per unfinished run; the workdirs get their scaling.json for `report`."""
  write_plan(out, plan)
  return [commands.train_command(r.config, run_dir(out, r), family=r.family, trainer=trainer)
          for r in plan.runs if not is_finished(run_dir(out, r), r.steps)]


def parser() -> ArgumentParser:
  doc = __doc__.split("\n\n")
  p = ArgumentParser(prog="python -m common.scaling.sweep", usage=doc[0].strip("`") + " [--config.KEY=VALUE ...]",
                     description="\n\n".join(doc[1:]).strip())
  p.add_argument("--family", help="MOD:FN, the model family (required), e.g. common.scaling.families:dense_lm")
  p.add_argument("--budgets", help="training FLOPs of each IsoFLOP curve, e.g. 1e13,3e13 (required)")
  p.add_argument("--sizes", help="the family's sizes to place on each curve (default: the family's)")
  p.add_argument("--out", help="the sweep folder (required)")
  p.add_argument("--emit_commands", action="store_true", help="print one trainer command per run instead")
  p.add_argument("--task", default=DEFAULT_TASK, help="MOD:FN, the training task built from a config")
  p.add_argument("--trainer", default="common.train", help="the entry point in emitted commands")
  p.add_argument("--tolerance", default="0.01", help="how far a run's FLOPs may be from its budget")
  p.add_argument("--report", default="true", help="write the report after the runs (true or false)")
  return p


def parse_flags(argv: Sequence[str]) -> tuple[dict, list[tuple[str, str]]]:
  """The flags (name -> value) and the `--config.KEY=VALUE` overrides, in order."""
  p = parser()
  args, rest = p.parse_known_args(argv)
  overrides = []
  for token in rest:
    name, eq, value = token.partition("=")
    if not name.startswith("--config.") or not eq:
      p.error(f"unknown flag '{name}'")
    overrides.append((name[len("--config."):], value))
  for required in ("family", "budgets", "out"):
    if not getattr(args, required):
      raise ConfigError(f"missing --{required}=...")
  return vars(args), overrides


def _true(text: str, flag: str) -> bool:
  if text.lower() in ("1", "true", "yes", "on", ""):
    return True
  if text.lower() in ("0", "false", "no", "off"):
    return False
  raise ConfigError(f"--{flag}: expected true or false, got '{text}'")


def plan_from_flags(flags: dict, overrides: Sequence[tuple[str, str]]) -> budget_lib.Plan:
  name, fn = families.resolve_family(flags["family"])
  try:
    tolerance = float(flags["tolerance"])
  except ValueError:
    raise ConfigError(f"--tolerance: expected a fraction such as 0.01, got '{flags['tolerance']}'") from None
  return budget_lib.plan_sweep(fn, budget_lib.parse_budgets(flags["budgets"]),
                               families.family_sizes(fn, flags.get("sizes")), family=name,
                               overrides=overrides, tolerance=tolerance)


def main(argv: Sequence[str]) -> int:
  flags, overrides = parse_flags(argv)
  plan = plan_from_flags(flags, overrides)
  out = flags["out"]
  if not plan.runs:
    raise ConfigError("--budgets/--sizes: no run fits its budget within --tolerance:\n  " +
                      "\n  ".join(plan.dropped))
  if flags["emit_commands"]:
    for line in plan.dropped:
      print(f"# dropped: {line}")
    for line in emit_commands(plan, out, trainer=flags["trainer"]):
      print(line)
    return 0
  task_fn = resolve_callable(flags["task"], "task")
  result = run_sweep(plan, out, task_fn=task_fn)
  if result.exit_code == 0 and _true(flags["report"], "report"):
    from common.scaling import report
    for path in report.write_report(out):
      print(f"[sweep] wrote {path}")
  return result.exit_code


if __name__ == "__main__":
  run_main(lambda: main(sys.argv[1:]))
