"""`python -m moe_scaling.reproduce [--out=runs/moe_scaling] [--sizes=32,48,64] [--steps=3000] [--seeds=3]
[--quick]`: the paper's headline comparison in miniature (Artetxe et al. 2021, sec. 4: perplexity and priming).

Each size is trained as a dense model and as its MoE partner (moe_scaling/model.py; by default the paper's
pairing: experts as wide as the dense FFN, top-2 with fairseq's second-expert sampling, capacity factor 1) on
the same tokens. Every run is validated --evals times during training (its curve against training FLOPs,
common.flops) and scored at the end on in-domain (validation Python) and out-of-domain (pydoc prose)
perplexity and on zero- and few-shot priming (moe_scaling/evaluate.py; MoE layers evaluate dropless, so a
sequence's scores do not depend on its batch).

The headline is the paper's compute equivalence: per seed, the law L(C) = E + K C^-gamma through the lower
envelope of the dense validation curves (the best loss any dense size reached by compute C), and for each MoE
run the dense compute that law needs to reach the MoE run's loss over the MoE run's compute, at half and at
all of its training (the paper: about 4x at modest budgets, narrowing at scale; smaller out of domain, which
is read from the final out-of-domain losses of the dense sizes). With --seeds N (default 3; --quick: 1) each
figure is the mean with a 95% t-interval; the routing statistics (drops at capacity, load imbalance) are
reported beside it.

Runs on the shared harness (common.reproduce): results.md, results.json (read by notebooks/moe_scaling.ipynb)
and loss_vs_compute.png (the validation curves) in --out; each run is a trainer workdir
--out/runs/<family>_d<size>_s<seed>, skipped when finished and scored (rescored when the scoring flags
changed), resumed when interrupted.

Cost: the defaults train 6 models of 3000 steps of 8 x 128 bytes (3M bytes, under one epoch of the corpus
slice) per seed; see moe_scaling/README.md for the wall-clock of the recorded run. --steps, --sizes,
--batch and --seeds scale it.
"""
from __future__ import annotations

import math
import os

import numpy as np

from common import reproduce
from common.flops import param_count, training_flops_per_token
from common.scaling import runs
from common.scaling.frontier import compute_equivalence, fit_loss_vs_compute, frontier
from common.scaling.runs import format_pm
from common.tasks import lm
from moe_scaling import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "tiny.py")
FAMILIES = ("dense", "moe")
PAPER = "~4x at modest budgets, narrowing at scale; less out of domain (sec. 4)"
DEFAULTS = dict(sizes="32,48,64", steps=3000, priming_n=32, eval_rows=64)
QUICK = dict(sizes="32,48", steps=4, priming_n=4, eval_rows=4)


def _eval_key(rows: list[dict]) -> str:
  """The trainer's validation cross-entropy: `eval/nll` (MoE: without the auxiliary losses), else `eval/loss`
  (dense models, where the two are equal)."""
  return "eval/nll" if any("eval/nll" in r for r in rows) else "eval/loss"


def routing_stats(rows: list[dict]) -> dict:
  """The MoE layers' routing statistics over the last quarter of training (means of the logged rows):
  fraction of assignments dropped at capacity, busiest expert's load over the mean load, balancing loss."""
  train = [r for r in rows if "moe/fraction_dropped" in r]
  tail = train[len(train) * 3 // 4:]
  return {k: float(np.mean([r[f"moe/{k}"] for r in tail])) if tail else math.nan
          for k in ("fraction_dropped", "max_load_ratio", "balance_loss")}


def dense_envelope(dense: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(compute, loss): the lower envelope of every dense run's validation curve (each point: training FLOPs
  spent by an eval step, loss there), i.e. the best loss any dense size reached by that compute."""
  points = sorted((c, v) for r in dense for c, v in zip(r["curve"]["flops"], r["curve"]["values"]))
  compute, loss, best = [], [], math.inf
  for c, v in points:
    if v < best:
      compute.append(c)
      loss.append(v)
      best = v
  return np.array(compute), np.array(loss)


def curve_equivalence(rows: list[dict]) -> list[dict]:
  """Artetxe et al. 2021's compute equivalence (sec. 4) on a training-FLOPs axis: per seed, the law L = E +
  K C^-gamma through the dense envelope (`dense_envelope`), and for each MoE run at half and at all of its
  training, the dense compute that law needs to reach the MoE loss over the MoE compute; then the mean and
  95% t-interval over seeds per MoE size. `beyond_dense` counts the seeds where the MoE loss is below every
  dense point (the factor then rests on the law extrapolated)."""
  per_size: dict[int, list[dict]] = {}
  for seed in sorted({r["seed"] for r in rows}):
    dense = [r for r in rows if r["family"] == "dense" and r["seed"] == seed]
    moe = [r for r in rows if r["family"] == "moe" and r["seed"] == seed]
    if not dense or not moe:
      continue
    compute, loss = dense_envelope(dense)
    law = fit_loss_vs_compute(compute, loss)
    for r in moe:
      c, v = r["curve"]["flops"], r["curve"]["values"]
      half = len(v) // 2 - 1 if len(v) > 1 else 0
      per_size.setdefault(r["d_model"], []).append(dict(
          flops=c[-1], loss=v[-1], factor=float(law.compute(v[-1])) / c[-1],
          factor_half=float(law.compute(v[half])) / c[half], beyond=bool(v[-1] < loss.min())))
  out = []
  for d_model, items in sorted(per_size.items()):
    factor, half = reproduce.t_interval([i["factor"] for i in items])
    factor_mid, half_mid = reproduce.t_interval([i["factor_half"] for i in items])
    out.append(dict(d_model=d_model, flops=float(np.mean([i["flops"] for i in items])),
                    loss=float(np.mean([i["loss"] for i in items])), factor=factor, ci95=half,
                    factor_half=factor_mid, ci95_half=half_mid, n=len(items),
                    beyond_dense=int(sum(i["beyond"] for i in items))))
  return out


def summarize(rows: list[dict], loss_key: str = "in_loss") -> list[dict]:
  """Per seed, the factor at each MoE point (dense compute / MoE compute at the MoE loss, from the law
  through the dense final points of that seed); then the mean and 95% t-interval over seeds per MoE size, over
  the seeds where the law reaches the MoE loss at all (`never` counts the others)."""
  per_size: dict[int, list[tuple[float, float]]] = {}
  for seed in sorted({r["seed"] for r in rows}):
    moe = [r for r in rows if r["family"] == "moe" and r["seed"] == seed]
    dense = [r for r in rows if r["family"] == "dense" and r["seed"] == seed]
    size_at = {float(r["flops"]): r["d_model"] for r in moe}
    for eq in compute_equivalence(moe, dense, loss_key=loss_key):
      per_size.setdefault(size_at[eq["compute"]], []).append((eq["compute"], eq["factor"]))
  out = []
  for d_model, pairs in sorted(per_size.items()):
    finite = [f for _, f in pairs if math.isfinite(f)]
    factor, half = reproduce.t_interval(finite) if finite else (math.inf, math.nan)
    out.append(dict(d_model=d_model, flops=sum(c for c, _ in pairs) / len(pairs), factor=factor, ci95=half,
                    n=len(pairs), never=len(pairs) - len(finite)))
  return out


def format_factor(s: dict) -> str:
  """'mean ± half x' over the seeds where the dense law reaches the MoE loss; how many seeds it never does
  (the MoE loss below the law's floor E)."""
  if s["never"] == s["n"]:
    return f"never ({s['n']}/{s['n']} seeds)"
  text = format_pm(s["factor"], s["ci95"], ".2f") + "x"
  return text + (f", never in {s['never']}/{s['n']}" if s["never"] else "")


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
  curves = curve_equivalence(rows)
  final = {s["d_model"]: s for s in summarize(rows)}
  ood = {s["d_model"]: s for s in summarize(rows, "ood_loss")}
  factor = lambda by_size, d: format_factor(by_size[d]) if d in by_size else "-"
  lines += ["", "Compute equivalence (the headline): dense compute / MoE compute at equal loss. Curves: the law "
            "through the lower envelope of the dense validation curves, at half and at all of each MoE run's "
            "training (a dense point mid-schedule is not annealed, which favours MoE); final points: the law "
            "through the dense sizes' final losses only (each at the end of its schedule), in and out of domain.",
            ""]
  lines += reproduce.table(
      ["MoE d_model", "MoE train FLOPs", "curves, half-way", "curves, end", "MoE below all dense points",
       "final points, in domain", "final points, out of domain", "seeds"],
      [([c["d_model"], f"{c['flops']:.3g}", format_pm(c["factor_half"], c["ci95_half"], ".2f") + "x",
         format_pm(c["factor"], c["ci95"], ".2f") + "x", f"{c['beyond_dense']}/{c['n']}",
         factor(final, c["d_model"]), factor(ood, c["d_model"]), c["n"]], PAPER) for c in curves])
  stats = [dict(d_model=d, **{k: reproduce.t_interval([r["routing"][k] for r in rows
                                                      if r["family"] == "moe" and r["d_model"] == d])
                              for k in ("fraction_dropped", "max_load_ratio", "balance_loss")})
           for d in sorted({r["d_model"] for r in rows if r["family"] == "moe"})]
  lines += ["", "Routing over the last quarter of training (mean over seeds): share of expert assignments dropped at "
            "capacity, the busiest expert's load over the mean, the balancing loss (1 = uniform).", "",
            "| MoE d_model | dropped | max load / mean | balance loss |", "|---|---|---|---|"]
  lines += [f"| {s['d_model']} | " + " | ".join(format_pm(*s[k], ".3f") for k in
                                               ("fraction_dropped", "max_load_ratio", "balance_loss")) + " |"
            for s in stats]
  return lines, dict(means=means, fits=fits, equivalence=dict(
      curves=curves, in_domain=list(final.values()), out_of_domain=list(ood.values())))


def plot(records: list[dict], path: str) -> str:
  """Validation loss against training FLOPs, one line per family and size (mean over seeds)."""
  lines = {}
  for family in FAMILIES:
    for d in sorted({r["d_model"] for r in records}):
      group = [dict(r, curves=dict(in_domain=r["curve"])) for r in records
               if r["family"] == family and r["d_model"] == d]
      if group:
        lines[f"{family} d{d}"] = (group, "in_domain")
  return reproduce.plot_curves({"in-domain validation loss": lines}, path, "nats per byte")


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
    p.add_argument("--pairing", default="shape", choices=("flops", "shape"),
                   help="shape: experts as wide as the dense FFN, the paper's (default); flops: half as wide")
    p.add_argument("--evals", type=int, default=8, help="validation points per run (the curves)")
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
    """The arm's config at --steps and --batch, validated --evals times (its curve) on 16 batches."""
    cfg = super().config(arm, seed)
    steps = self.args.steps
    cfg.train.update(batch_size=self.args.batch, warmup_steps=max(1, steps // 10))
    reproduce.schedule(cfg, steps, self.args.evals, log_every=max(1, steps // 40))
    cfg.eval.batches = 16
    cfg.checkpoint.keep = 1
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
    metrics = runs.read_metrics(workdir)
    flops_per_step = training_flops_per_token(cfg.model, seq_len) * a.batch * seq_len
    curve = runs.eval_curve(workdir, _eval_key(metrics), flops_per_step)._asdict()
    model = evaluate.load_trained(cfg, workdir, task)
    domains = evaluate.domain_perplexity(model, cfg.data, seq_len=seq_len, max_rows=a.eval_rows,
                                         user_glob=a.user_glob)
    priming = evaluate.priming_accuracy(model, shots=a.shots, n=a.priming_n, seq_len=seq_len)
    row = dict(flops=flops_per_step * a.steps, params=param_count(cfg.model), eval_loss=curve["values"][-1],
               curve=curve, routing=routing_stats(metrics), domains=domains, priming=priming)
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
    return plot(records, path)


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
