"""`python -m slag.reproduce [--out=runs/slag] [--seeds=3] [--quick]`

The comparison of Hase et al. (2023) in miniature. Per seed, on the generated knowledge base:
  base           the true/false classifier (slag.train stage=base); scored by updating every evaluation
                 belief with the off-the-shelf optimizers (SGD and Adam on all weights, until the prediction
                 flips or updates.max_steps), one at a time and in chains of r = updates.sequential;
  learned_plain  the learned optimizer trained on the main input and the KL term alone (KnowledgeEditor's
                 objective), one update per episode;
  learned_slag   the learned optimizer trained with the SLAG objective: paraphrases, entailed statements,
                 r successive updates per episode with the retain term;
both learned optimizers on the base run of their seed (OUT/runs/base_s<seed>), scored like the baselines.
The table: update success (main inputs, paraphrases, entailed statements), paraphrase consistency, retain
rate and change in accuracy on the other beliefs, for single (r=1) and sequential updates; the figure: the
belief graphs of single updates (an edge A -> B when updating A flips B) for Adam and SLAG, seed 0.

Runs on the shared harness (common.reproduce): OUT/results.md, OUT/results.json (read by
notebooks/slag.ipynb), OUT/belief_graphs.png. --seeds N (default 3; --quick 1): means with 95% t-intervals.
Cost: see slag/README.md for the measured wall time of the default study.
"""
from __future__ import annotations

import math
import os

import networkx as nx

from common import reproduce
from common.scaling.runs import format_pm
from common.train.restore import load_run_model
from slag import evaluate
from slag import graph as slag_graph
from slag import train as slag_train
from slag.model import hyper_param_filter

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "tiny.py")
# The paper's findings (no figure is quoted where we could not check the paper's tables).
PAPER = {"sgd": "off-the-shelf optimizers: surprisingly strong single-update baselines",
         "adam": "off-the-shelf optimizers: surprisingly strong single-update baselines",
         "learned_plain": "KnowledgeEditor objective: below SLAG, worst in sequential updates",
         "learned_slag": "SLAG: beats the baselines in the harder (sequential) setting; "
                         "all methods degrade as r grows"}
METHOD_LABELS = {"sgd": "SGD (until success)", "adam": "Adam (until success)",
                 "learned_plain": "learned optimizer, main + KL (KE objective)",
                 "learned_slag": "learned optimizer, SLAG objective"}
ARMS = (("base", "base classifier (+ SGD, Adam updates)", "stage=base"),
        ("learned_plain", METHOD_LABELS["learned_plain"], "stage=learned_opt,objective=plain"),
        ("learned_slag", METHOD_LABELS["learned_slag"], "stage=learned_opt,objective=slag"))
COLUMNS = (("update_success", "upd. success"), ("paraphrase_success", "paraphrase upd."),
           ("entailed_accuracy", "entailed acc."), ("consistency", "consistency"), ("retain_rate", "retain"),
           ("delta_accuracy", "delta acc."))
# --quick: a small knowledge base, a few steps per stage, few updates (config keys).
QUICK = {"data.num_entities": 16, "train.steps": 20, "learned_opt.episodes": 32, "learned_opt.eval_episodes": 8,
         "updates.max_single": 8, "updates.sequential": 4, "updates.chains": 2, "updates.max_steps": 10}


class Study(reproduce.Study):
  prog = "slag.reproduce"
  out = "runs/slag"
  plot_name = "belief_graphs.png"

  def arms(self) -> list[reproduce.Arm]:
    return [reproduce.Arm(name, label, f"{CONFIG}:{arg}", "slag.train", PAPER.get(name, ""))
            for name, label, arg in ARMS]

  def config(self, arm, seed):
    cfg = super().config(arm, seed)
    if self.args.quick:
      for key, value in QUICK.items():
        section, name = key.split(".")
        cfg[section][name] = value
      cfg.learned_opt.sequential = min(int(cfg.learned_opt.sequential), 2)
    if cfg.stage == "learned_opt":
      cfg.learned_opt.base_workdir = os.path.abspath(reproduce.workdir_of(self.args.out, self.arms()[0], seed))
    steps = int(cfg.train.steps)
    cfg.train.warmup_steps = min(int(cfg.train.warmup_steps), max(1, steps // 10))
    cfg.eval.every_steps = cfg.checkpoint.every_steps = max(1, math.ceil(steps / 4))
    cfg.log.every_steps = max(1, min(10, cfg.eval.every_steps))
    if cfg.stage == "base":
      slag_train.check_config(cfg)
      return slag_train.resolve(cfg)
    return cfg

  @staticmethod
  def make_task(cfg):
    slag_train.resolve(cfg)
    slag_train.validate(cfg)
    return slag_train.make_task(cfg)

  def score(self, arm, cfg, task, workdir) -> dict:
    seed = int(cfg.train.seed)
    if arm.name == "base":
      classifier = load_run_model(workdir, cfg, task.build_model, key="--out")[0]
      cfg.learned_opt.base_workdir = workdir
      points = slag_train.base_points(cfg, "eval")[0]
      fn = evaluate.make_updater("sgd", classifier, cfg.updates)[0]
      methods = {m: evaluate.evaluate_method(m, classifier, points, cfg.updates, seed) for m in ("sgd", "adam")}
      result = dict(base=evaluate.base_metrics(fn, points), methods=methods)
    else:
      model = load_run_model(workdir, cfg, task.build_model, key="--out", trainable=hyper_param_filter())[0]
      points = slag_train.base_points(cfg, "eval")[0]
      result = dict(methods={arm.name: evaluate.evaluate_method("learned", model.classifier, points, cfg.updates,
                                                                seed, cfg.learned_opt, model.hyper)})
    for name, m in result["methods"].items():
      self.log(f"{name} seed {seed}: single success {m['single']['update_success']:.1f}, retain "
               f"{m['single']['retain_rate']:.1f}; r={m['sequential_r']} success "
               f"{m['sequential']['update_success']:.1f}")
    return result

  def report(self, records):
    rows = summary(records)
    base = [r["base"] for r in records if "base" in r]
    lines = []
    if base:
      acc = reproduce.interval([b["accuracy"] for b in base])
      cons = reproduce.interval([b["consistency"] for b in base])
      lines += [f"Base classifier before any update: accuracy on the evaluation beliefs "
                f"{format_pm(acc[0], acc[1], '.1f')}, paraphrase consistency {format_pm(cons[0], cons[1], '.1f')} "
                f"({acc[2]} seeds).", ""]
    for setting, title in (("single", "Single updates (r = 1)"), ("sequential", "Sequential updates")):
      r = next((row["sequential_r"] for row in rows), 0)
      lines += [f"### {title}" + (f" (r = {r})" if setting == "sequential" else ""), ""]
      lines += reproduce.table(["method", *[c for _, c in COLUMNS], "seeds"], [(
          [row["label"], *[format_pm(row[f"{setting}/{k}"], row[f"{setting}/{k}_ci95"], ".1f") for k, _ in COLUMNS],
           row["n"]], PAPER.get(row["method"], "")) for row in rows], paper="paper (its finding)") + [""]
    lines += ["### Belief graphs of single updates (mean over seeds)", ""]
    lines += reproduce.table(["method", "edges", "mean out-degree", "updates flipping any", "mean corrupted",
                              "mean path length"], [(
        [row["label"], f"{row['graph/edges']:.1f}", f"{row['graph/mean_out_degree']:.2f}",
         f"{100 * row['graph/share_updates_flipping_any']:.0f}%", f"{row['graph/mean_corrupted_per_update']:.2f}",
         f"{row['graph/mean_path_length']:.2f}"], "") for row in rows], paper="-") + [""]
    return "\n".join(lines), dict(summary=rows)

  def plot(self, records, path):
    return plot_belief_graphs(records, path)


def plot_belief_graphs(records: list[dict], path: str) -> str:
  """The belief graphs of single updates with Adam and with the SLAG learned optimizer (the first seed that
  has each), with their out-degree histograms."""
  graphs = {}
  for method in ("adam", "learned_slag"):
    record = next((r for r in records if method in r.get("methods", {})), None)
    if record is not None:
      m = record["methods"][method]
      graph = nx.DiGraph()
      graph.add_nodes_from(range(m["num_beliefs"]))
      graph.add_edges_from(tuple(e) for e in m["edges"])
      graphs[f"{method}, seed {record['seed']}"] = graph
  return slag_graph.plot_graphs(graphs, path)


def summary(records: list[dict]) -> list[dict]:
  """One row per method: seed means and 95% half-widths of every metric, single and sequential, and of the
  belief-graph statistics."""
  rows = []
  for method in METHOD_LABELS:
    group = [r["methods"][method] for r in records if method in r.get("methods", {})]
    if not group:
      continue
    row = dict(method=method, label=METHOD_LABELS[method], n=len(group), sequential_r=group[0]["sequential_r"])
    for setting in ("single", "sequential"):
      for key, _ in COLUMNS:
        row[f"{setting}/{key}"], row[f"{setting}/{key}_ci95"], _ = reproduce.interval(
            [g[setting][key] for g in group])
    for key in ("edges", "mean_out_degree", "share_updates_flipping_any", "mean_corrupted_per_update",
                "mean_path_length"):
      row[f"graph/{key}"] = reproduce.interval([g["graph"][key] for g in group])[0]
    rows.append(row)
  return rows


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
