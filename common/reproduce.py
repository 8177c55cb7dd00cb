"""The reproduce harness every paper's `python -m <paper>.reproduce` runs on (ARCHITECTURE.md, the top floor).

A paper's reproduce.py declares its comparison as data, `Arm`s (a trainer config, a label, the paper's figure),
and subclasses `Study` for what differs: which arms its flags select, the config of one run, what is scored
after training, and the table of its headline metric. The harness does the rest the same way for every paper:

- each (arm, seed) is a workdir of the shared trainer, OUT/runs/<arm>_s<seed>: a finished and scored run is
  read back from its record (rescored when the scoring flags changed), a partial one resumes from its newest
  checkpoint (`common.train.loop.train`), a new one trains; a run made under another config (a changed flag,
  --set or default) is refused, naming the key, not reused;
- `--seeds N` (default 3, `--quick` 1) repeats every arm with train.seed 0..N-1, figures are the mean with a 95%
  t-interval (`common.scaling.intervals`);
- OUT/results.md (tables with the paper's figure in a column beside ours), OUT/results.json (what
  notebooks/<paper>.ipynb reads) and a plot against training FLOPs;
- `--emit_commands` prints one trainer command per run (for a cluster) instead of training.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from common.config import ConfigError, load
from common.scaling.intervals import t_interval
from common.scaling.runs import finished
from common.train.loop import train
from common.train.resume import config_changes

RECORD = "reproduce.json"  # a scored run's record, beside its metrics.jsonl


@dataclasses.dataclass(frozen=True)
class Arm:
  """One model of the comparison; `extra` is copied into each of its records (the keys a summary groups by)."""
  name: str     # runs live in OUT/runs/<name>_s<seed>
  label: str    # its row in the tables
  config: str   # 'path.py[:arg=value,...]' of its trainer config
  trainer: str  # the module whose `python -m` trains it (for --emit_commands)
  paper: str = ""  # the paper's figure for this arm's headline metric
  extra: dict = dataclasses.field(default_factory=dict)


def count_params(task) -> int:
  """Parameters of a task's model (every expert counted), from shapes only."""
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(task.build_model), nnx.Param))))


def interval(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, 95% half-width, count) over the finite values; NaNs where there are none."""
  finite = [float(v) for v in values if not math.isnan(v)]
  if not finite:
    return math.nan, math.nan, 0
  return (*t_interval(finite), len(finite))


def table(header: Sequence[str], rows: Sequence[tuple[Sequence[Any], str]], paper: str = "paper") -> list[str]:
  """Markdown lines of a table whose last column is the paper's figure beside ours: rows are (cells, paper)."""
  lines = ["| " + " | ".join([*header, paper]) + " |", "|" + "---|" * (len(header) + 1)]
  return lines + ["| " + " | ".join(str(c) for c in [*cells, figure or "-"]) + " |" for cells, figure in rows]


def mean_curves(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(flops, values) of curve `key` averaged over `records` (seeds) on the eval points they all have."""
  curves = [r["curves"][key] for r in records]
  n = min(len(c["values"]) for c in curves)
  if n == 0:
    return np.zeros(0), np.zeros(0)
  return np.mean([c["flops"][:n] for c in curves], axis=0), np.mean([c["values"][:n] for c in curves], axis=0)


def plot_curves(panels: dict[str, dict[str, list[dict]]], path: str, ylabel: str, target: str = "") -> str:
  """Eval metric against training FLOPs: one panel per title, one line per label (the mean over its records'
  `curves[key]`, given as {title: {label: (records, key)}}); the final value of line `target` dotted (the
  value the others are matched against)."""
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(4.8 * cols, 3.6 * rows))
  for i, (title, lines) in enumerate(panels.items()):
    ax = fig.add_subplot(rows, cols, i + 1)
    for j, (label, (records, key)) in enumerate(lines.items()):
      flops, values = mean_curves(records, key)
      if not len(values):
        continue
      ax.plot(flops, values, "o-", ms=3, color=f"C{j}", label=label)
      if label == target:
        ax.axhline(values[-1], color=f"C{j}", ls=":", lw=1)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def schedule(cfg: ml_collections.ConfigDict, steps: int, evals: int, log_every: int = 10) -> None:
  """`steps` with `evals` evals (the points of each curve) and a checkpoint at each; warmup at most a tenth."""
  every = max(1, math.ceil(steps / evals))
  cfg.train.update(steps=steps, warmup_steps=min(int(cfg.train.warmup_steps), max(1, steps // 10)))
  cfg.eval.every_steps = cfg.checkpoint.every_steps = every
  cfg.log.every_steps = max(1, min(log_every, every))


def config_diff(base: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """`--config.KEY=VALUE` flags that turn `base` into `cfg` (the trainer's own override syntax)."""
  flags = []
  for key, value in cfg.items():
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      flags += config_diff(base.get(key, ml_collections.ConfigDict()), value, name + ".")
    elif base.get(key) != value:
      text = value if isinstance(value, str) else ",".join(map(str, value)) if isinstance(value, (tuple, list)) \
          else repr(value)
      flags.append(f"--config.{name}={text}")
  return flags


def trainer_command(arm: Arm, cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """The shell command that trains (or resumes) one run with the package's own trainer."""
  path, sep, arg = arm.config.partition(":")
  path = os.path.relpath(path) if os.path.abspath(path).startswith(os.getcwd() + os.sep) else path
  argv = ["python", "-m", arm.trainer, f"--config={path}{sep}{arg}", f"--workdir={workdir}",
          *config_diff(load(arm.config), cfg)]
  return " ".join(shlex.quote(a) for a in argv)


class Study:
  """One paper's comparison. Subclasses set the class attributes and override `arms`, `score` and `report`
  (and `config`, `prepare`, `scoring`, `plot` where the defaults do not fit)."""
  prog = ""     # e.g. 'blt.reproduce'
  out = ""      # the default output folder
  plot_name = "loss_vs_flops.png"
  arm_groups: dict[str, tuple[str, ...]] = {}  # named selections for --arms (the first is its default)

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.command = ""  # the command line, as results.json records it

  @classmethod
  def add_flags(cls, parser: argparse.ArgumentParser) -> None:
    """The paper's own flags (the harness adds --out, --seeds, --quick, --emit_commands, --cache_dir, --set)."""

  def check(self) -> str:
    """A message naming the bad flag, or '' when the flags are usable."""
    return ""

  def log(self, msg: str) -> None:
    print(f"[{self.prog}] {msg}", flush=True)

  def prepare(self) -> None:
    """Shared artefacts the arms need (a tokenizer, an entropy model, a classifier), made once per OUT."""

  @classmethod
  def add_arms_flag(cls, parser: argparse.ArgumentParser, note: str = "") -> None:
    """--arms: one of `arm_groups` by name, or a comma list of arm names."""
    groups = ", ".join(f"'{name}' ({','.join(arms)})" for name, arms in cls.arm_groups.items())
    parser.add_argument("--arms", default=next(iter(cls.arm_groups)),
                        help=f"{groups}, or a comma list of arm names{note}")

  def arm_names(self) -> list[str]:
    """The arms --arms selects, in order."""
    a = self.args.arms
    return list(self.arm_groups[a]) if a in self.arm_groups else [n.strip() for n in a.split(",") if n.strip()]

  def unknown_arm(self) -> str:
    """A message naming the first selected arm that no group holds, or ''."""
    known = list(dict.fromkeys(n for arms in self.arm_groups.values() for n in arms))
    names = self.arm_names()
    bad = [n for n in names if n not in known]
    if bad or not names:
      return f"--arms: unknown arm '{bad[0] if bad else self.args.arms}' (known: {', '.join(known)})"
    return ""

  def arm_of(self, name: str) -> Arm:
    raise NotImplementedError

  def arms(self) -> list[Arm]:
    return [self.arm_of(n) for n in self.arm_names()]

  def config(self, arm: Arm, seed: int) -> ml_collections.ConfigDict:
    """The trainer config of one run: the arm's config file, --set overrides, the seed and the cache."""
    cfg = load(arm.config, [tuple(item.split("=", 1)) for item in self.args.set])
    cfg.train.seed = seed
    cfg.log.progress = "lines"
    if self.args.cache_dir:
      cfg.data.cache_dir = self.args.cache_dir
    return cfg

  def make_task(self, cfg):
    raise NotImplementedError

  def scoring(self) -> dict:
    """The flags a run's scores depend on; a record made with other values is rescored (not retrained)."""
    return {}

  def score(self, arm: Arm, cfg, task, workdir: str) -> dict:
    """What one trained run contributes to the study (curves, final metrics, generation scores)."""
    raise NotImplementedError

  def report(self, records: list[dict]) -> tuple[str, dict]:
    """(markdown of results.md, the summaries results.json holds beside the runs: {'summary': rows, ...})."""
    raise NotImplementedError

  def plot(self, records: list[dict], path: str) -> str:
    raise NotImplementedError


def paced(cfg: ml_collections.ConfigDict, evals: int) -> ml_collections.ConfigDict:
  """`cfg` with its warmup, evals, checkpoints and logs scaled to its resolved `train.steps`: warmup at most
  a tenth of the run, `evals` evaluations, two checkpoints, a log line at least every 10 steps."""
  steps = int(cfg.train.steps)
  cfg.train.warmup_steps = min(int(cfg.train.warmup_steps), max(1, steps // 10))
  cfg.eval.every_steps = max(1, math.ceil(steps / evals))
  cfg.checkpoint.every_steps = max(1, math.ceil(steps / 2))
  cfg.log.every_steps = max(1, min(10, cfg.eval.every_steps))
  return cfg


def workdir_of(out: str, arm: Arm, seed: int) -> str:
  return os.path.join(out, "runs", f"{arm.name}_s{seed}")


def read_record(workdir: str) -> dict | None:
  """The record the harness wrote after scoring the run in `workdir`, if any (with the run's config under
  'config', which `run_one` leaves out of what it returns)."""
  path = os.path.join(workdir, RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_same_run(workdir: str, record: dict, cfg: dict) -> None:
  """Refuses a run whose record says it was made under another config than the study's for it now (a changed
  flag, --set or default): it would be read back or rescored as if it were this one. More steps extend a run."""
  changes = config_changes(record.get("config") or {}, cfg)
  for key, (before, after) in changes.items():
    if key != "train.steps" or int(after) < int(before):
      raise ConfigError(f"'{workdir}' holds a run with {key}={before!r}, this study's config for it has "
                        f"{after!r}: use another --out (or move that run away) to train it anew")


def run_one(study: Study, arm: Arm, seed: int) -> dict:
  """Skips (a scored run), resumes (a partial one) or trains one run through the shared trainer; its record.
  A run made under another config is refused (`check_same_run`)."""
  workdir, scoring = workdir_of(study.args.out, arm, seed), study.scoring()
  cfg = study.config(arm, seed)
  made_under = json.loads(cfg.to_json_best_effort())  # as the study makes it, before a task resolves it in place
  record = read_record(workdir)
  if record is not None:
    check_same_run(workdir, record, made_under)
    if record.get("scoring") == scoring and finished(workdir, int(cfg.train.steps)):
      return {k: v for k, v in record.items() if k != "config"}
  task = study.make_task(cfg)
  start = time.time()
  if not finished(workdir, int(cfg.train.steps)):
    study.log(f"{arm.label} seed {seed}: {cfg.train.steps} steps -> {workdir}")
    status = train(cfg, workdir, task)
    if status != 0:
      raise SystemExit(f"[{study.prog}] {arm.label} seed {seed} stopped with status {status}; rerun to resume "
                       f"({workdir})")
  record = dict(name=arm.name, label=arm.label, seed=seed, paper=arm.paper, **arm.extra,
                **study.score(arm, cfg, task, workdir), scoring=scoring)
  record["wall_s"] = time.time() - start
  with open(os.path.join(workdir, RECORD), "w") as f:
    json.dump(dict(record, config=made_under), f, indent=1)
  return record


def write_results(study: Study, records: list[dict]) -> str:
  """OUT/results.md, OUT/results.json (what notebooks/<paper>.ipynb reads) and the plot; the markdown."""
  text, summaries = study.report(records)
  out = study.args.out
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(dict(command=study.command, args=vars(study.args), table=text, **summaries, runs=records), f,
              indent=1)
  study.plot(records, os.path.join(out, study.plot_name))
  return text


def parser(study: type[Study], doc: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m {study.prog}", description=doc.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=study.out, help="output folder: results.md, results.json, the plot, runs/")
  p.add_argument("--seeds", type=int, default=0, help="seeds per arm (default 3; --quick: 1)")
  p.add_argument("--quick", action="store_true", help="tiny models, a few steps each: a smoke run")
  p.add_argument("--emit_commands", action="store_true",
                 help="print one trainer command per run (for a cluster) instead of training")
  p.add_argument("--cache_dir", default="", help="data cache of every run (default: data.cache_dir of its config)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override of every run (repeatable), e.g. --set=model.d_model=128")
  study.add_flags(p)
  return p


def main(study_cls: type[Study], doc: str, argv: Sequence[str] | None = None) -> int:
  """`python -m <paper>.reproduce`: parse, train or resume every run, then write the tables, JSON and plot."""
  p = parser(study_cls, doc)
  a = p.parse_args(argv)
  a.seeds = a.seeds or (1 if a.quick else 3)
  study = study_cls(a)
  study.command = " ".join(["python", "-m", study.prog, *(sys.argv[1:] if argv is None else argv)])
  error = ("--seeds must be >= 1" if a.seeds < 1 else
           next((f"--set={s}: expected KEY=VALUE" for s in a.set if "=" not in s), "") or study.check())
  if error:
    p.error(error)
  os.makedirs(a.out, exist_ok=True)
  study.prepare()
  runs = [(arm, seed) for seed in range(a.seeds) for arm in study.arms()]
  if a.emit_commands:
    for arm, seed in runs:
      print(trainer_command(arm, study.config(arm, seed), workdir_of(a.out, arm, seed)), flush=True)
    return 0
  records = [run_one(study, arm, seed) for arm, seed in runs]
  text = write_results(study, records)
  print(text, flush=True)
  study.log(f"wrote {a.out}/results.md, results.json, {study.plot_name}")
  return 0

