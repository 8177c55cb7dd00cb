"""`python -m ease.reproduce [--out=runs/ease] [--steps=N] [--seeds=3] [--quick]`: the comparison of Li et al.
(2021) in miniature, on generated documents (ease/data.py).

Arms: the abstractive-only baseline (the whole document), extract-then-abstract with a fixed extractor (the
lead sentences at the same budget), and EASE trained end to end at several priors pi and weights beta, at the
sentence and at the token level. Every run is scored (ease/evaluate.py) on greedy summaries of the eval
documents from the evidence at each of --budgets (top-k units; the whole document for the baseline): ROUGE-1/2/L,
evidence precision/recall against the gold key sentences, faithfulness and the compression rate. The table is
at --budget (the share the EASE and lead runs keep at inference); the plot is ROUGE-L against evidence size.
We found no numbers of the paper's tables to quote, so the paper column states its claims (sec. 5).

`--study=levels`: the paper's token-vs-sentence contrast. On each generated style (ease/data.py, `data.style`:
cnndm, whole key sentences restated; xsum, one-sentence summaries of key spans scattered over distractor
sentences), EASE at the sentence and at the token level with the same pi, beta and budgets (0.2 and 0.4: at 0.2
a sentence-level extractor keeps 1-2 of 6-10 sentences, mostly fewer than the 2-3 key ones, while the xsum
summary's content words are about 6% of the document's tokens, room a token-level one has); a table per budget of
ROUGE-1/2/L, evidence precision/recall and size, style x level, and token minus sentence level in ROUGE-L.

Runs on the shared harness (common.reproduce): results.md, results.json (read by notebooks/ease.ipynb) and
rouge_vs_evidence.png in --out; each run is a trainer workdir --out/runs/<arm>_s<seed>. `--study=levels` writes
the same files, its own, under --out/levels.

Cost: see ease/README.md for the measured time of the default study; `--study=levels` prints its estimate.
"""
from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.figure import Figure

from common import reproduce
from common.scaling.runs import format_pm, read_metrics
from ease import evaluate, train
from ease.model import flops_per_row

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "tiny.py")
PAPER = {
    "abstractive": "the upper reference: EASE stays close to it in ROUGE",
    "lead": "below EASE (the paper's extract-then-abstract baselines)",
    "ease_sentence": "close to the full-document abstractor; sentence level better on CNN/DM",
    "ease_token": "token level better on XSum",
}
# (name, variant, level, pi, beta)
ARMS = (("abstractive", "abstractive", "sentence", 0.3, 0.0), ("lead", "lead", "sentence", 0.3, 0.0),
        ("ease_sent_pi0.3_b0.1", "ease", "sentence", 0.3, 0.1), ("ease_sent_pi0.5_b0.1", "ease", "sentence", 0.5, 0.1),
        ("ease_sent_pi0.3_b1", "ease", "sentence", 0.3, 1.0), ("ease_tok_pi0.3_b0.1", "ease", "token", 0.3, 0.1))
QUICK_ARMS = ("abstractive", "lead", "ease_sent_pi0.3_b0.1", "ease_tok_pi0.3_b0.1")
DEFAULTS = dict(steps=300, docs=128, train_docs=20000, budgets="0.2,0.4,0.6,1.0")
QUICK = dict(steps=6, docs=16, train_docs=256, budgets="0.2,0.4,0.6,1.0")
STUDIES = ("main", "levels")
# --study=levels: (style, level) arms at the main study's EASE setting that matched the abstractor, pi 0.3 and
# beta 0.1. 4800 training documents = 300 steps x batch 16, each seen once, as the main study's runs see theirs.
LEVELS = tuple((style, level) for style in ("cnndm", "xsum") for level in ("sentence", "token"))
LEVEL_PI, LEVEL_BETA = 0.3, 0.1
LEVEL_PAPER = {
    ("cnndm", "sentence"): "CNN/DM: sentence level better than token level",
    ("cnndm", "token"): "CNN/DM: below sentence level",
    ("xsum", "sentence"): "XSum: below token level",
    ("xsum", "token"): "XSum: token level better than sentence level",
}
LEVEL_DEFAULTS = dict(steps=300, docs=128, train_docs=4800, budgets="0.2,0.4")
LEVEL_QUICK = dict(steps=2, docs=8, train_docs=64, budgets="0.4")  # one budget: one decoder compile per level
LEVEL_QUICK_MODEL = dict(d_model=32, n_heads=2, d_ff=64, n_layers=1)  # a smoke run in seconds, not a result
# Seconds of one levels run at the default model, measured on the 2 shared CPU cores at a load average of about 5
# (idle cores are faster): start-up, compiles, evals and checkpoints; a train step of batch 16 (either level);
# a summary of one eval document at one budget.
LEVEL_COST_S = dict(run=20.0, step=0.29, summary=0.01)
METRICS = ("rouge1", "rouge2", "rougeL", "evidence_precision", "evidence_recall", "faithfulness", "compression")


def _final(workdir: str, key: str) -> float:
  value = math.nan
  for row in read_metrics(workdir):
    value = row.get(key, value)
  return value


def seed_means(records: list[dict], budget: str) -> list[dict]:
  """One row per arm (in arm order): mean and 95% half-width over seeds of each metric at `budget` (the
  baseline: at 1, the whole document)."""
  out = []
  for name in dict.fromkeys(r["name"] for r in records):
    group = [r for r in records if r["name"] == name]
    at = budget if budget in group[0]["budgets"] else "1"
    row = dict(name=name, label=group[0]["label"], paper=group[0]["paper"], budget=at, n=len(group),
               variant=group[0]["variant"], level=group[0]["level"])
    for k in METRICS:
      row[k], row[f"{k}_ci95"], _ = reproduce.interval([r["budgets"][at][k] for r in group])
    row["eval_nll"], row["eval_nll_ci95"], _ = reproduce.interval([r["eval_nll"] for r in group])
    out.append(row)
  return out


def curves(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
  """Per arm label: (mean compression, mean ROUGE-L) over seeds at each scored budget, by evidence size."""
  out = {}
  for label in dict.fromkeys(r["label"] for r in records):
    group = [r for r in records if r["label"] == label]
    budgets = sorted(group[0]["budgets"], key=float)
    out[label] = [(float(np.mean([r["budgets"][b]["compression"] for r in group])),
                   float(np.mean([r["budgets"][b]["rougeL"] for r in group]))) for b in budgets]
  return out


def plot(curve: dict[str, list[tuple[float, float]]], path: str) -> str:
  fig = Figure(figsize=(5.6, 4.0))
  ax = fig.add_subplot(1, 1, 1)
  for i, (label, points) in enumerate(curve.items()):
    xs, ys = zip(*points)
    ax.plot(xs, ys, "o-" if len(xs) > 1 else "*", ms=4 if len(xs) > 1 else 10, color=f"C{i}", label=label)
  ax.set(xlabel="evidence size (kept share of document tokens)", ylabel="ROUGE-L F1",
         title="ROUGE-L against evidence size")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


class Study(reproduce.Study):
  prog = "ease.reproduce"
  out = "runs/ease"
  plot_name = "rouge_vs_evidence.png"

  @classmethod
  def add_flags(cls, p) -> None:
    p.add_argument("--study", default="main", choices=STUDIES,
                   help="main: the arms above; levels: sentence vs token level on the cnndm and xsum styles")
    p.add_argument("--steps", type=int, default=0, help=f"default {DEFAULTS['steps']}; --quick: {QUICK['steps']} "
                   f"(levels: {LEVEL_QUICK['steps']})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--budget", type=float, default=0.4, help="the share of units kept at inference in the table "
                   "(levels: a table at every scored budget)")
    p.add_argument("--budgets", default="", help=f"evidence shares scored (the plot's points; default "
                   f"{DEFAULTS['budgets']}, levels: {LEVEL_DEFAULTS['budgets']})")
    p.add_argument("--docs", type=int, default=0, help=f"eval documents summarised (default {DEFAULTS['docs']}; "
                   f"--quick: {QUICK['docs']}, levels: {LEVEL_QUICK['docs']})")
    p.add_argument("--train_docs", type=int, default=0, help=f"generated training documents (default "
                   f"{DEFAULTS['train_docs']}, levels: {LEVEL_DEFAULTS['train_docs']}; --quick: "
                   f"{QUICK['train_docs']}, levels: {LEVEL_QUICK['train_docs']})")

  def __init__(self, args):
    super().__init__(args)
    self.levels = args.study == "levels"
    defaults = (LEVEL_QUICK if args.quick else LEVEL_DEFAULTS) if self.levels else QUICK if args.quick else DEFAULTS
    for key, value in defaults.items():
      setattr(args, key, getattr(args, key) or value)
    self.budgets = sorted({float(b) for b in args.budgets.split(",")} | {args.budget})
    if self.levels:  # its own results.md, results.json, plot and runs, beside the main study's
      args.out = os.path.join(args.out, "levels")
      self.plot_name = "rouge_by_level.png"

  def check(self) -> str:
    if not all(0 < b <= 1 for b in self.budgets):
      return "--budget and --budgets must be shares in (0, 1]"
    return "--steps and --docs must be positive" if min(self.args.steps, self.args.docs) < 1 else ""

  def prepare(self) -> None:
    if self.levels and not self.args.quick:
      self.log(f"--study=levels: {self.args.seeds * len(LEVELS)} runs of {self.args.steps} steps, about "
               f"{self.estimate_s() / 60:.0f} min on 2 CPU cores (at most; measured on busy ones)")

  def estimate_s(self) -> float:
    """The levels study's run time from measured costs (LEVEL_COST_S), scaled to the flags."""
    a, c = self.args, LEVEL_COST_S
    per_run = c["run"] + a.steps * a.batch / 16 * c["step"] + len(self.budgets) * a.docs * c["summary"]
    return a.seeds * len(LEVELS) * per_run

  def arms(self) -> list[reproduce.Arm]:
    if self.levels:
      return [reproduce.Arm(f"{style}_{level}", f"{style} {level}",
                            f"{CONFIG}:variant=ease,level={level},pi={LEVEL_PI},beta={LEVEL_BETA}", "ease.train",
                            LEVEL_PAPER[style, level], dict(variant="ease", level=level, style=style, pi=LEVEL_PI,
                                                            beta=LEVEL_BETA)) for style, level in LEVELS]
    arms = []
    for name, variant, level, pi, beta in ARMS:
      if self.args.quick and name not in QUICK_ARMS:
        continue
      label = name if variant != "ease" else f"EASE {level} pi={pi:g} beta={beta:g}"
      paper = PAPER[name] if variant != "ease" else PAPER[f"ease_{level}"]
      arms.append(reproduce.Arm(name, label, f"{CONFIG}:variant={variant},level={level},pi={pi},beta={beta}",
                                "ease.train", paper, dict(variant=variant, level=level, pi=pi, beta=beta)))
    return arms

  def config(self, arm, seed):
    cfg = super().config(arm, seed)
    a = self.args
    reproduce.schedule(cfg, a.steps, evals=2)
    cfg.train.batch_size = a.batch
    cfg.checkpoint.keep = 1
    cfg.model.budget = a.budget
    cfg.data.train_docs = a.train_docs
    cfg.eval.batches = max(1, min(8, a.docs // a.batch))
    if self.levels:
      cfg.data.style = arm.extra["style"]
      if a.quick:
        cfg.model.update(LEVEL_QUICK_MODEL)
    return train.resolve(cfg)

  @staticmethod
  def make_task(cfg):
    return train.make_task(cfg)

  def scoring(self) -> dict:
    return dict(budgets=self.budgets, docs=self.args.docs)

  def score(self, arm, cfg, task, workdir) -> dict:
    """Training FLOPs, the final eval nll, and the metrics at each budget (the baseline: the whole document)."""
    _, data, model = evaluate.load_run(workdir)
    budgets = [1.0] if arm.extra["variant"] == "abstractive" else self.budgets
    scores = evaluate.evaluate(model, data, budgets=budgets, docs=self.args.docs)
    rows = cfg.train.steps * cfg.train.batch_size
    return dict(flops=flops_per_row(cfg.model, data.seq_len) * rows, eval_nll=_final(workdir, "eval/nll"),
                budgets=scores["budgets"], samples=scores["samples"])

  def report(self, records):
    if self.levels:
      return self.levels_report(records)
    budget = f"{self.args.budget:g}"
    means = seed_means(records, budget)
    pm = lambda m, k: format_pm(m[k], m[f"{k}_ci95"], ".3f")
    lines = [f"Greedy summaries of {self.args.docs} eval documents, evidence at budget {budget} (abstractive: the "
             f"whole document); mean over seeds with 95% t-intervals.", ""]
    lines += reproduce.table(
        ["arm", "seeds", "ROUGE-1", "ROUGE-2", "ROUGE-L", "evidence P", "evidence R", "faithfulness",
         "compression", "eval nll"],
        [([m["label"], m["n"], *(pm(m, k) for k in METRICS), pm(m, "eval_nll")], m["paper"]) for m in means])
    curve = curves(records)
    lines += ["", "ROUGE-L at each evidence budget (mean over seeds; compression in brackets):", ""]
    budgets = [f"{b:g}" for b in self.budgets]
    lines += ["| arm | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    for label, points in curve.items():
      cells = [f"{y:.3f} ({x:.2f})" for x, y in points]
      cells = cells if len(cells) == len(budgets) else ["-"] * (len(budgets) - 1) + cells
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", dict(summary=means, curves=curve)

  def levels_report(self, records):
    """A table per budget (style x level), then token minus sentence level in ROUGE-L, paired by seed."""
    style = {r["name"]: r["style"] for r in records}
    pm = lambda m, k: format_pm(m[k], m[f"{k}_ci95"], ".3f")
    keys = ("rouge1", "rouge2", "rougeL", "evidence_precision", "evidence_recall", "compression")
    lines = [f"EASE (pi={LEVEL_PI:g}, beta={LEVEL_BETA:g}) at the sentence and the token level on the two generated "
             f"styles: greedy summaries of {self.args.docs} eval documents from the evidence at each budget; mean "
             f"over seeds with 95% t-intervals. Evidence P/R: token-weighted against the gold key sentences; "
             f"size: the kept share of document tokens."]
    summary = []
    for b in self.budgets:
      means = [dict(m, style=style[m["name"]]) for m in seed_means(records, f"{b:g}")]
      lines += ["", f"Budget {b:g}:", ""]
      lines += reproduce.table(["style", "level", "seeds", "ROUGE-1", "ROUGE-2", "ROUGE-L", "evidence P",
                                "evidence R", "evidence size"],
                               [([m["style"], m["level"], m["n"], *(pm(m, k) for k in keys)], m["paper"])
                                for m in means])
      summary += means
    lines += ["", "ROUGE-L of token minus sentence level (the same seed's runs paired):", ""]
    rows, gaps = [], []
    for name in ("cnndm", "xsum"):
      cells = []
      for b in (f"{b:g}" for b in self.budgets):
        rouge = {level: {r["seed"]: r["budgets"][b]["rougeL"] for r in records
                         if r["style"] == name and r["level"] == level} for level in ("sentence", "token")}
        mean, ci, n = reproduce.interval([rouge["token"][s] - rouge["sentence"][s] for s in rouge["token"]
                                          if s in rouge["sentence"]])
        gaps.append(dict(style=name, budget=b, token_minus_sentence=mean, ci95=ci, n=n))
        cells.append(f"{mean:+.3f}" + ("" if math.isnan(ci) else f" ± {ci:.3f}"))
      rows.append(([name, *cells], "token > sentence" if name == "xsum" else "token < sentence"))
    lines += reproduce.table(["style", *(f"budget {b:g}" for b in self.budgets)], rows)
    return "\n".join(lines) + "\n", dict(summary=summary, gaps=gaps, curves=curves(records))

  def plot(self, records, path):
    return plot(curves(records), path)


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
