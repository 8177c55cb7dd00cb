"""`python -m icl_explanations.reproduce [--out=DIR] [--seeds=3] [--families=arith] [--steps=N] [--quick]`

Ye et al. (2023) in miniature: one small dense LM per seed meta-trained for in-context learning with
explanations (icl_explanations.train), then every evaluation arm on that same model (selection, perturbation
and lambda are evaluation-time choices), on held-out test episodes:
  perturbations   each explanation perturbation (data.PERTURBATIONS), random exemplars, per trained family;
  selection       random, nearest neighbours and MMR (lambda = --lam) under each similarity, on mixed
                  arithmetic queries (plus and times: two operators whose glyphs the exemplars must reveal);
  lambda sweep    MMR under --similarity for lambda from 1 (nearest neighbours) to 0;
  complementarity mixed queries with add-only, multiply-only, or add and multiply exemplars.
Accuracy of the extracted answers (and, for arithmetic, of the generated rule), means over seeds with 95%
t-intervals, the paper's figures beside ours.

Runs on the shared harness (common.reproduce): OUT/results.md, OUT/results.json (read by
notebooks/icl_explanations.ipynb), OUT/lambda_sweep.png; each model is an icl_explanations.train workdir
OUT/runs/meta_s<seed>, skipped when finished and scored, resumed when interrupted.

Cost: see icl_explanations/README.md for the measured wall time of the default study.
"""
from __future__ import annotations

import dataclasses
import math
import os

from matplotlib.figure import Figure

from common import reproduce
from common.scaling.runs import format_pm, read_metrics
from common.train.restore import load_run_model
from icl_explanations import data as icl_data
from icl_explanations import evaluate
from icl_explanations import similarity as icl_similarity
from icl_explanations import train as icl_train

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "tiny.py")
LAMBDAS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.2, 0.0)
# The paper's GSM accuracy along its lambda axis from 1.0 to 0.0 (code-davinci-002; as the issue lists them).
PAPER_LAMBDA = ("66.7", "66.9", "68.2", "68.2", "66.8", "65.9", "63.5")
# GSM / ECQA / e-SNLI accuracy (code-davinci-002).
PAPER_SELECTION = {"random": "64.6 / 74.7 / 74.9", "nn": "66.7 / 75.9 / 75.6", "mmr": "68.2 / 78.1 / 77.8"}
# The direction the paper reports for each perturbation (sec. 4), relative to the unperturbed explanation.
PAPER_PERTURBATION = {"none": "reference", "mask_ops": "lower", "mask_values": "lower",
                      "incorrect_values": "lower, less than expected", "borrowed": "lower", "no_nl": "lower",
                      "no_trace": "lower", "no_explanation": "lowest"}
PAPER_COMPOSITION = {"add_only": "lower", "mul_only": "lower", "add_and_mul": "highest (complementary)",
                     "random": "-"}
STEPS = 320            # meta-training steps of the default study (batch 16: each episode seen once, 5120)
EPISODES = 16          # evaluation episodes per arm (selection, lambda, complementarity: 4 queries each)
PERTURB_QUERIES = 64   # perturbation arms: one query per episode, its shots as the whole pool
POOL = 16
QUICK = dict(steps=30, episodes=2, perturb_queries=4)


def arm(families: str) -> reproduce.Arm:
  return reproduce.Arm("meta", "meta-trained dense LM", f"{CONFIG}:families={families}", "icl_explanations.train",
                       extra=dict(families=families))


def grid(families: list[str], lam: float, similarity: str) -> list[tuple[str, str, evaluate.Setting]]:
  """(key, episode set, setting) of every evaluation arm."""
  out = [(f"perturb/{f}/{p}", f"perturb/{f}", evaluate.Setting(perturbation=p))
         for f in families for p in icl_data.PERTURBATIONS]
  if "arith" not in families:
    return out
  out.append(("select/random", "mixed", evaluate.Setting("random")))
  out += [(f"select/{s}/{m}", "mixed", evaluate.Setting(m, s, lam))
          for s in icl_similarity.SIMILARITIES for m in ("nn", "mmr")]
  out += [(f"lambda/{l:g}", "mixed", evaluate.Setting("mmr", similarity, l)) for l in LAMBDAS]
  out += [(f"compose/{c}", "compose", evaluate.Setting(composition=c)) for c in evaluate.COMPOSITIONS]
  return out


def episode_sets(families: list[str], shots: int, episodes: int, perturb_queries: int, seed: int) -> dict:
  sets = {f"perturb/{f}": evaluate.generated_episodes(f, "", episodes=perturb_queries, pool_size=shots, queries=1,
                                                     seed=seed) for f in families}
  if "arith" in families:
    sets["mixed"] = evaluate.generated_episodes("arith", "mixed", episodes=episodes, pool_size=POOL, queries=4,
                                                seed=seed)
    sets["compose"] = evaluate.generated_episodes("arith", "mixed", episodes=episodes, pool_size=2 * shots,
                                                  queries=4, seed=seed, pool_forms=["add"] * shots + ["mul"] * shots)
  return sets


def _cell(records: list[dict], key: str, metric: str = "accuracy") -> tuple[float, float]:
  mean, ci, _ = reproduce.interval([r["evals"][key].get(metric, math.nan) for r in records if key in r["evals"]])
  return mean, ci


def _pm(value: tuple[float, float]) -> str:
  return format_pm(value[0], value[1], ".1f")


def tables(records: list[dict]) -> tuple[list[str], list[dict]]:
  """The four tables (markdown) and their rows (results.json's summary)."""
  keys = list(dict.fromkeys(k for r in records for k in r["evals"]))
  rows = []
  for key in keys:
    acc, rule = _cell(records, key), _cell(records, key, "rule_accuracy")
    rows.append(dict(key=key, accuracy=acc[0], accuracy_ci95=acc[1], rule_accuracy=rule[0], rule_accuracy_ci95=rule[1],
                     n=sum(key in r["evals"] for r in records)))
  lines = []
  families = list(dict.fromkeys(k.split("/")[1] for k in keys if k.startswith("perturb/")))
  if families:
    lines += ["### Perturbed explanations (random exemplars; accuracy %)", ""] + reproduce.table(
        ["explanation", *families], [([p, *(_pm(_cell(records, f"perturb/{f}/{p}")) for f in families)],
                                      PAPER_PERTURBATION[p]) for p in icl_data.PERTURBATIONS],
        paper="paper (direction, sec. 4)") + [""]
  if "select/random" in keys:
    body = [(["random", "-", _pm(_cell(records, "select/random")), _pm(_cell(records, "select/random",
                                                                             "rule_accuracy"))],
             PAPER_SELECTION["random"])]
    for method in ("nn", "mmr"):
      for s in icl_similarity.SIMILARITIES:
        k = f"select/{s}/{method}"
        body.append(([method, s, _pm(_cell(records, k)), _pm(_cell(records, k, "rule_accuracy"))],
                     PAPER_SELECTION[method] if s == "bm25" else ""))
    lines += ["### Exemplar selection (mixed arithmetic queries)", ""] + reproduce.table(
        ["selection", "similarity", "accuracy", "rule accuracy"], body,
        paper="paper GSM / ECQA / e-SNLI") + [""]
    lines += ["### MMR lambda sweep", ""] + reproduce.table(
        ["lambda", "accuracy", "rule accuracy"],
        [([f"{l:g}", _pm(_cell(records, f"lambda/{l:g}")), _pm(_cell(records, f"lambda/{l:g}", "rule_accuracy"))],
          paper) for l, paper in zip(LAMBDAS, PAPER_LAMBDA)], paper="paper GSM (1.0 to 0.0)") + [""]
    lines += ["### Complementarity (mixed queries: plus and times)", ""] + reproduce.table(
        ["exemplars", "accuracy", "rule accuracy"],
        [([c, _pm(_cell(records, f"compose/{c}")), _pm(_cell(records, f"compose/{c}", "rule_accuracy"))],
          PAPER_COMPOSITION[c]) for c in evaluate.COMPOSITIONS], paper="paper (direction, sec. 5)") + [""]
  loss = reproduce.interval([r.get("eval_loss", math.nan) for r in records])
  lines += [f"Meta-training: {records[0].get('steps', '?')} steps, held-out eval/loss "
            f"{format_pm(loss[0], loss[1], '.3f')} over {loss[2]} seeds.", ""]
  return lines, rows


def plot(rows: list[dict], path: str) -> str:
  """MMR accuracy and rule accuracy against lambda (seed means, 95% intervals), the paper's GSM curve beside."""
  by_key = {r["key"]: r for r in rows}
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  lams = [l for l in LAMBDAS if f"lambda/{l:g}" in by_key]
  for metric, color, label in (("accuracy", "C0", "answer accuracy"), ("rule_accuracy", "C1", "rule accuracy")):
    values = [by_key[f"lambda/{l:g}"][metric] for l in lams]
    errors = [0 if math.isnan(by_key[f"lambda/{l:g}"][f"{metric}_ci95"]) else by_key[f"lambda/{l:g}"][f"{metric}_ci95"]
              for l in lams]
    ax.errorbar(lams, values, yerr=errors, fmt="o-", color=color, label=f"ours: {label}", capsize=3)
  ax.plot(LAMBDAS, [float(p) for p in PAPER_LAMBDA], "s:", color="gray", label="paper GSM (code-davinci-002)")
  ax.set(xlabel="MMR lambda (1 = nearest neighbours)", ylabel="accuracy (%)", title="MMR lambda sweep")
  ax.invert_xaxis()
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


class Study(reproduce.Study):
  prog = "icl_explanations.reproduce"
  out = "runs/icl_explanations"
  plot_name = "lambda_sweep.png"

  @classmethod
  def add_flags(cls, p) -> None:
    p.add_argument("--families", default="arith",
                   help=f"families the model is meta-trained and evaluated on (comma list of {icl_data.FAMILIES})")
    p.add_argument("--similarity", default="bm25",
                   help=f"the lambda sweep's similarity ({', '.join(icl_similarity.SIMILARITIES)})")
    p.add_argument("--lam", type=float, default=0.5, help="MMR's lambda in the selection table")
    p.add_argument("--episodes", type=int, default=0, help=f"evaluation episodes per arm (0: {EPISODES})")
    p.add_argument("--steps", type=int, default=0,
                   help=f"meta-training steps per seed (0: {STEPS}); one fresh episode per sequence")

  def family_list(self) -> list[str]:
    return [f.strip() for f in self.args.families.split(",") if f.strip()]

  def check(self) -> str:
    bad = [f for f in self.family_list() if f not in icl_data.FAMILIES]
    if bad or not self.family_list():
      return f"--families: unknown family '{bad[0] if bad else ''}' (valid: {', '.join(icl_data.FAMILIES)})"
    if self.args.similarity not in icl_similarity.SIMILARITIES:
      return f"--similarity: unknown similarity '{self.args.similarity}'"
    if self.args.steps < 0 or self.args.episodes < 0:
      return "--steps and --episodes: must be >= 0"
    return "" if 0 <= self.args.lam <= 1 else "--lam: must be in [0, 1]"

  def arms(self) -> list[reproduce.Arm]:
    return [arm(",".join(self.family_list()))]

  def config(self, a, seed):
    cfg = super().config(a, seed)
    steps = self.args.steps or (QUICK["steps"] if self.args.quick else STEPS)
    cfg.data.train_examples = steps * int(cfg.train.batch_size)
    reproduce.schedule(cfg, steps, evals=4, log_every=25)
    icl_train.resolve(cfg)
    return cfg

  @staticmethod
  def make_task(cfg):
    return icl_train.make_task(cfg)

  def scoring(self) -> dict:
    return dict(similarity=self.args.similarity, lam=self.args.lam, episodes=self.args.episodes,
                quick=self.args.quick)

  def score(self, a, cfg, task, workdir) -> dict:
    _, tokenizer = icl_train.data_for(cfg)
    model = load_run_model(workdir, cfg, task.build_model, key="--out")[0]
    quick = self.args.quick
    episodes = self.args.episodes or (QUICK["episodes"] if quick else EPISODES)
    sets = episode_sets(self.family_list(), int(cfg.data.shots), episodes,
                        QUICK["perturb_queries"] if quick else PERTURB_QUERIES, seed=1000 + int(cfg.train.seed))
    evals, done = {}, {}  # an arm that repeats another (lambda 1 is nearest neighbours) is scored once
    for key, episode_set, setting in grid(self.family_list(), self.args.lam, self.args.similarity):
      setting = dataclasses.replace(setting, shots=int(cfg.data.shots))
      if setting.selection == "nn" or setting.lam == 1.0:
        setting = dataclasses.replace(setting, selection="nn", lam=1.0)
      if (episode_set, setting) not in done:
        done[episode_set, setting] = evaluate.evaluate_episodes(
            model, tokenizer, sets[episode_set], setting, seed=int(cfg.train.seed),
            examples=2 if key.endswith("/none") or key == "select/random" else 0)
      result = evals[key] = done[episode_set, setting]
      self.log(f"seed {cfg.train.seed} {key}: accuracy {result['accuracy']:.1f}"
               + (f", rule {result['rule_accuracy']:.1f}" if "rule_accuracy" in result else ""))
    metrics = [m for m in read_metrics(workdir) if "eval/loss" in m]
    return dict(evals=evals, steps=int(cfg.train.steps), eval_loss=metrics[-1]["eval/loss"] if metrics else math.nan)

  def report(self, records):
    lines, rows = tables(records)
    return "\n".join(lines), dict(summary=rows)

  def plot(self, records, path):
    return plot(tables(records)[1], path)


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
