"""`python -m optiml.reproduce [--out=runs/optiml] [--arms=default|headline|NAME,...] [--seeds=3] [--quick]`

The comparison of Iyer et al. 2022 (OPT 30B against OPT-IML 30B, tables 6-7; ablations of sec. 4) in
miniature, on the generated suite (optiml/data.py) with its three levels of held-out evaluation:
  base          a small dense LM pretrained from scratch on generic text (the embedded corpus and the training
                tasks' unlabelled inputs): prepared once per seed, shared by every other arm of that seed;
  it            the base instruction-tuned on the training tasks' mixture (examples-proportional, cap 64,
                half the examples with demonstrations, reasoning and dialogue components);
ablations, each the `it` recipe with one change:
  it_cap8       task cap 8 (the paper's cap ablation, sec. 4.2);
  it_tasks10    10 training tasks instead of all (scaling the task count, sec. 4.1);
  it_no_demos   no demonstrations in training (sec. 4.4);
  it_paper_mix  the paper's benchmark proportions (approximate) instead of examples-proportional (sec. 4.3).
Every run is scored 0-shot and k-shot (k = data.eval_shots) on fully held-out categories, held-out tasks of
seen categories and held-out instances of seen tasks (optiml/evaluate.py); the headline is the mean of the
three levels.

Runs on the shared harness (common.reproduce): OUT/results.md, OUT/results.json (read by
notebooks/optiml.ipynb), OUT/levels.png; each run is an optiml.train workdir OUT/runs/<arm>_s<seed>, skipped
when finished and scored, resumed when interrupted. --seeds N (default 3; --quick 1 seed of the headline arms
on a short stream): means with 95% t-intervals.

Cost: see optiml/README.md for the measured wall time of the default study.
"""
from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.figure import Figure

from common import reproduce
from common.scaling.runs import format_pm, read_metrics
from common.train.restore import load_run_model
from optiml import data as optiml_data
from optiml import evaluate
from optiml import train as optiml_train

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "tiny.py")
# The paper's average over its held-out evaluations, 0-shot / 32-shot (OPT 30B, OPT-IML 30B; sec. 5).
PAPER = {"base": "59.2 / 60.5", "it": "66.3 / 64.4"}
LABELS = {"base": "base (pretrained only)", "it": "instruction-tuned", "it_cap8": "IT, task cap 8",
          "it_tasks10": "IT, 10 training tasks", "it_no_demos": "IT, no demonstrations in training",
          "it_paper_mix": "IT, paper's benchmark proportions"}
OVERRIDES = {"base": dict(stage="pretrain"), "it": {}, "it_cap8": dict(task_cap=8),
             "it_tasks10": dict(num_train_tasks=10), "it_no_demos": dict(train_demo_fraction=0.0),
             "it_paper_mix": dict(proportions="paper")}
HEADLINE_ARMS = ("base", "it")
DEFAULT_ARMS = tuple(OVERRIDES)
# The study's sizes (data.* keys), and --quick's: a short stream and a light base.
STUDY = dict(train_examples=2500, corpus_bytes=200_000)
BASE_EPOCHS = 2.0
QUICK = dict(train_examples=240, corpus_bytes=20_000, eval_instances=4)
EVALS_PER_RUN = 4


def arm_of(name: str) -> reproduce.Arm:
  stage = "pretrain" if name == "base" else "instruct"
  return reproduce.Arm(name, LABELS[name], f"{CONFIG}:stage={stage}", "optiml.train", PAPER.get(name, ""),
                       dict(ablation=name not in HEADLINE_ARMS))


def tables(records: list[dict], shots: int) -> tuple[list[str], list[dict]]:
  """Seed means per arm, and the markdown table: each level 0-shot and k-shot, their averages."""
  keys = [f"{level}/{k}shot" for level in optiml_data.LEVELS for k in (0, shots)] + ["avg/0shot", f"avg/{shots}shot"]
  rows = []
  for name in dict.fromkeys(r["name"] for r in records):
    group = [r for r in records if r["name"] == name]
    row = dict(name=name, label=group[0]["label"], n=len(group), paper=PAPER.get(name, ""))
    for key in keys + ["flops"]:
      row[key], row[f"{key}_ci95"], _ = reproduce.interval([r.get(key, math.nan) for r in group])
    rows.append(row)
  header = ["model"] + [f"{short} {k}-shot" for short in ("held-out category", "held-out task", "held-out instance")
                        for k in (0, shots)] + ["avg 0-shot", f"avg {shots}-shot", "train FLOPs", "seeds"]
  lines = reproduce.table(header, [(
      [r["label"]] + [format_pm(r[k], r[f"{k}_ci95"], ".1f") for k in keys] + [f"{r['flops']:.3g}", r["n"]],
      r["paper"]) for r in rows], paper="paper avg 0 / 32-shot (OPT / OPT-IML 30B)")
  return lines, rows


def plot(rows: list[dict], shots: int, path: str) -> str:
  """Each arm's score per level (and their mean), 0-shot (left) and k-shot (right), seed means with 95%
  intervals."""
  fig = Figure(figsize=(12, 4.2))
  levels = [*optiml_data.LEVELS, "avg"]
  width = 0.8 / max(len(rows), 1)
  for panel, k in enumerate((0, shots)):
    ax = fig.add_subplot(1, 2, panel + 1)
    for j, row in enumerate(rows):
      x = np.arange(len(levels)) + (j - (len(rows) - 1) / 2) * width
      ci = [row[f"{level}/{k}shot_ci95"] for level in levels]
      ax.bar(x, [row[f"{level}/{k}shot"] for level in levels], width,
             yerr=[0 if math.isnan(c) else c for c in ci], color=f"C{j}", label=row["label"])
    ax.set_xticks(np.arange(len(levels)))
    ax.set_xticklabels([level.replace("heldout_", "held-out ") for level in levels], fontsize=8)
    ax.set(ylabel="mean task score (x100)", title=f"{k}-shot")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


class Study(reproduce.Study):
  prog = "optiml.reproduce"
  out = "runs/optiml"
  plot_name = "levels.png"
  arm_groups = dict(default=DEFAULT_ARMS, headline=HEADLINE_ARMS)
  arm_of = staticmethod(arm_of)

  @classmethod
  def add_flags(cls, p) -> None:
    cls.add_arms_flag(p, "; the base is always prepared; --quick's default is 'headline'")
    p.add_argument("--max_per_task", type=int, default=6, help="evaluation instances scored per task (0: all)")

  def check(self) -> str:
    return self.unknown_arm()

  def arm_names(self) -> list[str]:
    if self.args.quick and self.args.arms == "default":
      return list(HEADLINE_ARMS)
    names = super().arm_names()
    return names if "base" in names else ["base", *names]

  def prepare(self) -> None:
    """The base of each seed, trained and scored first (every other arm of the seed starts from it)."""
    for seed in range(self.args.seeds):
      if not self.args.emit_commands:
        reproduce.run_one(self, arm_of("base"), seed)

  def config(self, arm, seed):
    """The arm's config: the study's sizes, the arm's change, the seed's base (`init.run`), train.steps from
    the stream, EVALS_PER_RUN evals and two checkpoints."""
    cfg = super().config(arm, seed)
    given = {item.split("=", 1)[0] for item in self.args.set}  # --set wins over the study's sizes
    sizes = dict(QUICK if self.args.quick else STUDY)
    if arm.name == "base":
      sizes["epochs"] = 1.0 if self.args.quick else BASE_EPOCHS
    cfg.data.update({k: v for k, v in sizes.items() if f"data.{k}" not in given})
    cfg.data.update(OVERRIDES[arm.name])
    if arm.name != "base":
      cfg.init.run = os.path.abspath(reproduce.workdir_of(self.args.out, arm_of("base"), seed))
      if not os.path.exists(os.path.join(cfg.init.run, "config.json")):  # --emit_commands before the base ran
        return cfg
    optiml_train.resolve(cfg)
    return reproduce.paced(cfg, EVALS_PER_RUN)

  @staticmethod
  def make_task(cfg):
    return optiml_train.make_task(cfg)

  def scoring(self) -> dict:
    return dict(max_per_task=self.args.max_per_task)

  def score(self, arm, cfg, task, workdir) -> dict:
    _, split, tokenizer = optiml_train.data_for(cfg)
    model = load_run_model(workdir, cfg, task.build_model, key="--out")[0]
    shots = int(cfg.data.eval_shots)
    result = evaluate.evaluate_split(model, tokenizer, split, shots=(0, shots), max_per_task=self.args.max_per_task)
    flops_per_step = task.train_flops_per_example * int(cfg.train.batch_size)
    evals = [m for m in read_metrics(workdir) if "eval/loss" in m]
    result["curves"] = {"heldout_instance_answer_loss": dict(
        steps=[m["step"] for m in evals], flops=[m["step"] * flops_per_step for m in evals],
        values=[m["eval/loss"] for m in evals])}
    result.update(shots=shots, steps=int(cfg.train.steps), flops=flops_per_step * int(cfg.train.steps),
                  train_tasks=len(split.train), leaked_dropped=split.dropped)
    self.log(f"{arm.label} seed {cfg.train.seed}: avg 0-shot {result['avg/0shot']:.1f}, "
             f"{shots}-shot {result[f'avg/{shots}shot']:.1f}")
    return result

  def report(self, records):
    shots = int(records[0]["shots"])
    lines, rows = tables(records, shots)
    text = "\n".join(["### Held-out generalisation (mean task score x100; seed mean ± 95% interval)", "", *lines])
    return text, dict(summary=rows, shots=shots)

  def plot(self, records, path):
    shots = int(records[0]["shots"])
    return plot(tables(records, shots)[1], shots, path)


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
