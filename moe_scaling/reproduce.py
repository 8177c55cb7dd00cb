"""`python -m moe_scaling.reproduce [--out=runs/moe_scaling] [--sizes=32,64,96] [--steps=3000] [--seeds=3]
[--quick]`: the paper's headline comparison in miniature (Artetxe et al. 2021, sec. 4: perplexity and priming).

Each size is one compute budget: the dense model and its FLOP-matched MoE partner (moe_scaling/model.py) see
the same tokens, as in the paper, so the budgets differ by model size. Every run is scored on in-domain
(validation Python) and out-of-domain (pydoc prose) perplexity and on zero- and few-shot priming
(moe_scaling/evaluate.py). Per family we fit L(C) = E + K C^-gamma on in-domain cross-entropy against
training FLOPs (common.flops, common.scaling.frontier) and report the compute-equivalence factor: how much
more compute the dense law needs to reach each MoE model's loss (the paper: about 4x at modest budgets,
narrowing at scale; smaller out of domain), on the in-domain and the out-of-domain loss. With --seeds N
(default 3; --quick: 1) every run is repeated with N seeds (init and data order) and each figure is the mean
with a 95% t-interval.

Runs on the shared harness (common.reproduce): results.md, results.json (read by notebooks/moe_scaling.ipynb)
and loss_vs_compute.png in --out; each run is a trainer workdir --out/runs/<family>_d<size>_s<seed>, skipped
when finished and scored (rescored when the scoring flags changed), resumed when interrupted.

Cost: the defaults train 6 models of 3000 steps of 8 x 128 bytes (3M bytes, under one epoch of the corpus
slice) and score each, per seed. On a near-idle 2-core CPU a step of d_model 64 took 0.053 s dense and 0.17 s
MoE (8 full-width experts, capacity mode); scaling those by each model's FLOPs per step (common.flops: 0.58 /
1.96 / 4.15 GFLOP at d 32 / 64 / 96) and adding about a minute of compilation and scoring per run gives an
estimate of 45-60 minutes per seed, not a timing of the whole study. --steps, --sizes, --batch and --seeds
scale it.
"""
from __future__ import annotations

import math
import os

from common import reproduce
from common.flops import param_count, training_flops_per_token
from common.scaling import plots
from common.scaling.frontier import compute_equivalence, fit_loss_vs_compute, frontier
from common.scaling.runs import format_pm, read_metrics
from common.tasks import lm
from moe_scaling import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "tiny.py")
FAMILIES = ("dense", "moe")
PAPER = "~4x at modest budgets, narrowing at scale; less out of domain (sec. 4)"
DEFAULTS = dict(sizes="32,64,96", steps=3000, priming_n=32, eval_rows=64)
QUICK = dict(sizes="32,48", steps=4, priming_n=4, eval_rows=4)


def _final_eval(workdir: str) -> float:
  """The trainer's last validation cross-entropy: `eval/nll` (MoE: without the auxiliary losses), else
  `eval/loss` (dense models, where the two are equal)."""
  value = math.nan
  for row in read_metrics(workdir):
    value = row.get("eval/nll", row.get("eval/loss", value))
  return value


def summarize(rows: list[dict], loss_key: str = "in_loss") -> list[dict]:
  """Per seed, the factor at each MoE point (dense compute / MoE compute at the MoE loss, from the dense
  law of that seed); then the mean and 95% t-interval over seeds per MoE size."""
  per_size: dict[int, list[tuple[float, float]]] = {}
  for seed in sorted({r["seed"] for r in rows}):
    moe = [r for r in rows if r["family"] == "moe" and r["seed"] == seed]
    dense = [r for r in rows if r["family"] == "dense" and r["seed"] == seed]
    size_at = {float(r["flops"]): r["d_model"] for r in moe}
    for eq in compute_equivalence(moe, dense, loss_key=loss_key):
      per_size.setdefault(size_at[eq["compute"]], []).append((eq["compute"], eq["factor"]))
  out = []
  for d_model, pairs in sorted(per_size.items()):
    factor, half = reproduce.t_interval([f for _, f in pairs])
    out.append(dict(d_model=d_model, flops=sum(c for c, _ in pairs) / len(pairs), factor=factor, ci95=half,
                    n=len(pairs)))
  return out


def seed_means(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
  """One row per (family, size): the mean and 95% half-width over seeds of each of `keys`."""
  out = []
  for family in FAMILIES:
    for d_model in sorted({r["d_model"] for r in rows}):
      group = [r for r in rows if r["family"] == family and r["d_model"] == d_model]
      if not group:
        continue
      mean = dict(family=family, d_model=d_model, budget=d_model, n=len(group), params=group[0]["params"])
      for k in keys:
        mean[k], mean[f"{k}_ci95"] = reproduce.t_interval([r[k] for r in group])
      out.append(mean)
  return out


def tables(rows: list[dict], shots) -> tuple[list[str], dict]:
  keys = ("flops", "in_loss", "in_ppl", "ood_ppl") + tuple(f"{s}shot" for s in shots)
  means = seed_means(rows, keys)
  shot_cols = " | ".join(f"{s}-shot acc" for s in shots)
  lines = [f"| family | d_model | params (active) | train FLOPs | in-domain ppl | out-of-domain ppl | {shot_cols} |",
           "|---|---|---|---|---|---|" + "---|" * len(shots)]
  for m in means:
    p = m["params"]
    active = p.get("active_non_embedding", p["non_embedding"])
    accs = " | ".join(format_pm(m[f"{s}shot"], m[f"{s}shot_ci95"], ".3f") for s in shots)
    lines.append(f"| {m['family']} | {m['d_model']} | {p['non_embedding'] / 1e6:.2f}M ({active / 1e6:.2f}M) | "
                 f"{m['flops']:.3g} | {format_pm(m['in_ppl'], m['in_ppl_ci95'], '.3f')} | "
                 f"{format_pm(m['ood_ppl'], m['ood_ppl_ci95'], '.3f')} | {accs} |")
  fits = {}
  for family in FAMILIES:
    law = fit_loss_vs_compute(*frontier([m for m in means if m["family"] == family], loss_key="in_loss"))
    fits[family] = dict(E=law.E, K=law.K, gamma=law.gamma)
  lines += ["", "Fits of in-domain cross-entropy (nats/byte) on training FLOPs C (seed means): "
            + "; ".join(f"{f}: L = {v['E']:.3f} + {v['K']:.3g} C^-{v['gamma']:.3f}" for f, v in fits.items()), ""]
  equivalence = dict(in_domain=summarize(rows), out_of_domain=summarize(rows, "ood_loss"))
  lines += reproduce.table(
      ["MoE d_model", "MoE train FLOPs", "dense/MoE compute at equal in-domain loss", "at equal out-of-domain loss",
       "seeds"],
      [([ind["d_model"], f"{ind['flops']:.3g}", format_pm(ind["factor"], ind["ci95"], ".2f") + "x",
         format_pm(ood["factor"], ood["ci95"], ".2f") + "x", ind["n"]], PAPER)
       for ind, ood in zip(equivalence["in_domain"], equivalence["out_of_domain"])])
  return lines, dict(means=means, fits=fits, equivalence=equivalence)


def plot(means: list[dict], path: str) -> str:
  """Both families' seed-mean frontiers and laws against training FLOPs, with each MoE point's factor."""
  return plots.compute_equivalence([m for m in means if m["family"] == "moe"],
                                   [m for m in means if m["family"] == "dense"], path, label_a="moe",
                                   label_b="dense", loss_key="in_loss")


class Study(reproduce.Study):
  prog = "moe_scaling.reproduce"
  out = "runs/moe_scaling"
  plot_name = "loss_vs_compute.png"

  @classmethod
  def add_flags(cls, p) -> None:
    p.add_argument("--sizes", default="", help=f"d_model of each budget, 3+ for the E term of the fit (default "
                   f"{DEFAULTS['sizes']}; --quick: {QUICK['sizes']})")
    p.add_argument("--steps", type=int, default=0, help=f"default {DEFAULTS['steps']}; --quick: {QUICK['steps']}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--mode", default="capacity", choices=("capacity", "dropless"))
    p.add_argument("--pairing", default="flops", choices=("flops", "shape"))
    p.add_argument("--shots", default="0,4", help="priming shot counts")
    p.add_argument("--priming_n", type=int, default=0, help="questions per priming task and shot count (default "
                   f"{DEFAULTS['priming_n']}; --quick: {QUICK['priming_n']})")
    p.add_argument("--eval_rows", type=int, default=0, help="rows of 128 bytes scored per domain (default "
                   f"{DEFAULTS['eval_rows']}; --quick: {QUICK['eval_rows']})")
    p.add_argument("--user_glob", default="", help="text files scored as a further out-of-domain set")

  def __init__(self, args):
    super().__init__(args)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
      setattr(args, key, getattr(args, key) or value)
    self.sizes = [int(s) for s in args.sizes.split(",")]
    args.shots = tuple(int(s) for s in args.shots.split(","))

  def check(self) -> str:
    if len(self.sizes) < 2:
      return "--sizes needs at least two sizes (three or more for the E term of the fit)"
    return "--steps must be positive" if self.args.steps < 1 else ""

  def arms(self) -> list[reproduce.Arm]:
    a = self.args
    return [reproduce.Arm(f"{family}_d{d}", f"{family} d_model={d}",
                          f"{CONFIG}:family={family},d_model={d},experts={a.experts},mode={a.mode},"
                          f"pairing={a.pairing}", "moe_scaling.train", PAPER if family == "moe" else "",
                          dict(family=family, d_model=d, budget=d)) for d in self.sizes for family in FAMILIES]

  def config(self, arm, seed):
    """The arm's config at --steps and --batch, evaluated and checkpointed once, at the end."""
    cfg = super().config(arm, seed)
    steps = self.args.steps
    cfg.train.update(steps=steps, batch_size=self.args.batch, warmup_steps=max(1, steps // 10))
    cfg.eval.every_steps = cfg.checkpoint.every_steps = steps
    cfg.checkpoint.keep = 1
    cfg.log.every_steps = max(1, steps // 4)
    return cfg

  @staticmethod
  def make_task(cfg):
    return lm.lm_task(lm.resolve(cfg))  # model.vocab_size from the byte vocabulary

  def scoring(self) -> dict:
    a = self.args
    return dict(shots=list(a.shots), priming_n=a.priming_n, eval_rows=a.eval_rows, user_glob=a.user_glob)

  def score(self, arm, cfg, task, workdir) -> dict:
    """Training FLOPs, in/out-of-domain cross-entropy per byte and perplexity, priming accuracy per shot count."""
    a, seq_len = self.args, cfg.data.seq_len
    model = evaluate.load_trained(cfg, workdir, task)
    domains = evaluate.domain_perplexity(model, cfg.data, seq_len=seq_len, max_rows=a.eval_rows,
                                         user_glob=a.user_glob)
    priming = evaluate.priming_accuracy(model, shots=a.shots, n=a.priming_n, seq_len=seq_len)
    row = dict(flops=training_flops_per_token(cfg.model, seq_len) * a.steps * a.batch * seq_len,
               params=param_count(cfg.model), eval_loss=_final_eval(workdir), domains=domains, priming=priming)
    row["in_loss"] = domains.get("python/bpb", math.nan) * math.log(2)  # nats per byte
    row["ood_loss"] = domains.get("prose/bpb", math.nan) * math.log(2)
    row["in_ppl"], row["ood_ppl"] = math.exp(row["in_loss"]), math.exp(row["ood_loss"])
    for shot in a.shots:
      accs = [v for k, v in priming.items() if k.startswith(f"{shot}shot/")]
      row[f"{shot}shot"] = sum(accs) / len(accs)
    return row

  def report(self, records):
    lines, summary = tables(records, self.args.shots)
    return "\n".join(lines) + "\n", summary

  def plot(self, records, path):
    return plot(seed_means(records, ("flops", "in_loss")), path)


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
