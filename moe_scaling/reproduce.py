"""`python -m moe_scaling.reproduce [--out=runs/moe_scaling] [--sizes=32,64,96] [--steps=3000] [--seeds=1]`:
the paper's headline comparison in miniature (Artetxe et al. 2021, sec. 4: perplexity and priming).

Each size is one compute budget: the dense model and its FLOP-matched MoE partner (moe_scaling/model.py) see
the same tokens, as in the paper, so the budgets differ by model size. Every run is scored on in-domain
(validation Python) and out-of-domain (pydoc prose) perplexity and on zero- and few-shot priming
(moe_scaling/evaluate.py). Per family we fit L(C) = E + K C^-gamma on in-domain cross-entropy against
training FLOPs (common.flops, common.scaling.frontier) and report the compute-equivalence factor: how much
more compute the dense law needs to reach each MoE model's loss (the paper: about 4x at modest budgets,
narrowing at scale; smaller out of domain), on the in-domain and the out-of-domain loss. With --seeds N every
run is repeated with N seeds (init and data order) and each figure is the mean with a 95% t-interval.

Writes table.md, results.json and loss_vs_compute.png into --out; each run lives in --out/<family>_d<size>_s
<seed> and is skipped when its result.json exists (rescored when the scoring flags changed), so an interrupted
study resumes where it stopped.

Cost: the defaults train 6 models of 3000 steps of 8 x 128 bytes (3M bytes, under one epoch of the corpus
slice) and score each. On a near-idle 2-core CPU a step of d_model 64 took 0.053 s dense and 0.17 s MoE
(8 full-width experts, capacity mode); scaling those by each model's FLOPs per step (common.flops: 0.58 /
1.96 / 4.15 GFLOP at d 32 / 64 / 96) and adding about a minute of compilation and scoring per run gives an
estimate of 45-60 minutes, not a timing of the whole study. --steps, --sizes, --batch and --seeds scale it.
"""
from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from common.scaling.runs import format_pm, read_metrics  # pylint: disable=g-import-not-at-top

FAMILIES = ("dense", "moe")


def run_config(family: str, d_model: int, seed: int, a):
  from moe_scaling.configs.tiny import get_config
  cfg = get_config(f"family={family},d_model={d_model},experts={a.experts},mode={a.mode},pairing={a.pairing}")
  cfg.train.update(steps=a.steps, seed=seed, batch_size=a.batch, warmup_steps=max(1, a.steps // 10))
  cfg.eval.every_steps = cfg.checkpoint.every_steps = a.steps
  cfg.checkpoint.keep = 1
  cfg.log.update(progress="lines", every_steps=max(1, a.steps // 4))
  return cfg


def _final_eval(workdir: str) -> float:
  """The trainer's last validation cross-entropy: `eval/nll` (MoE: without the auxiliary losses), else
  `eval/loss` (dense models, where the two are equal)."""
  value = math.nan
  for row in read_metrics(workdir):
    value = row.get("eval/nll", row.get("eval/loss", value))
  return value


def train_and_score(family: str, d_model: int, seed: int, a) -> dict:
  """One run's result row, read from its result.json when it finished before; status != 0 when training
  stopped early (no scores then; rerunning resumes it)."""
  workdir = os.path.join(a.out, f"{family}_d{d_model}_s{seed}")
  done = os.path.join(workdir, "result.json")
  scoring = dict(shots=list(a.shots), priming_n=a.priming_n, eval_rows=a.eval_rows, user_glob=a.user_glob)
  if os.path.exists(done):
    with open(done) as f:
      row = json.load(f)
    if row.get("scoring") == scoring:
      return row
  from common.flops import param_count, training_flops_per_token
  from common.tasks.lm import lm_task
  from common.train.loop import train
  from moe_scaling import evaluate
  cfg = run_config(family, d_model, seed, a)
  task = lm_task(cfg)  # resolves model.vocab_size
  trained = os.path.isdir(os.path.join(workdir, "checkpoints", str(a.steps)))  # stopped while scoring
  status = 0 if trained else train(cfg, workdir, task)
  seq_len = cfg.data.seq_len
  row = dict(family=family, d_model=d_model, seed=seed, budget=d_model, status=status,
             flops=training_flops_per_token(cfg.model, seq_len) * a.steps * a.batch * seq_len,
             params=param_count(cfg.model))
  if status != 0:
    return row
  model = evaluate.load_trained(cfg, workdir, task)
  domains = evaluate.domain_perplexity(model, cfg.data, seq_len=seq_len, max_rows=a.eval_rows,
                                       user_glob=a.user_glob)
  priming = evaluate.priming_accuracy(model, shots=a.shots, n=a.priming_n, seq_len=seq_len)
  row.update(eval_loss=_final_eval(workdir), domains=domains, priming=priming, scoring=scoring)
  row["in_loss"] = domains.get("python/bpb", math.nan) * math.log(2)  # nats per byte
  row["ood_loss"] = domains.get("prose/bpb", math.nan) * math.log(2)
  row["in_ppl"], row["ood_ppl"] = math.exp(row["in_loss"]), math.exp(row["ood_loss"])
  for shot in a.shots:
    row[f"{shot}shot"] = sum(v for k, v in priming.items() if k.startswith(f"{shot}shot/")) / len(
        [k for k in priming if k.startswith(f"{shot}shot/")])
  with open(done, "w") as f:
    json.dump(row, f, indent=1)
  return row


def summarize(rows: list[dict], loss_key: str = "in_loss") -> list[dict]:
  """Per seed, the factor at each MoE point (dense compute / MoE compute at the MoE loss, from the dense
  law of that seed); then the mean and 95% t-interval over seeds per MoE size."""
  from common.scaling.frontier import compute_equivalence
  from common.scaling.intervals import t_interval
  per_size: dict[int, list[tuple[float, float]]] = {}
  for seed in sorted({r["seed"] for r in rows}):
    moe = [r for r in rows if r["family"] == "moe" and r["seed"] == seed]
    dense = [r for r in rows if r["family"] == "dense" and r["seed"] == seed]
    size_at = {float(r["flops"]): r["d_model"] for r in moe}
    for eq in compute_equivalence(moe, dense, loss_key=loss_key):
      per_size.setdefault(size_at[eq["compute"]], []).append((eq["compute"], eq["factor"]))
  out = []
  for d_model, pairs in sorted(per_size.items()):
    factor, half = t_interval([f for _, f in pairs])
    out.append(dict(d_model=d_model, flops=sum(c for c, _ in pairs) / len(pairs), factor=factor, ci95=half,
                    n=len(pairs)))
  return out


def seed_means(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
  """One row per (family, size): the mean and 95% half-width over seeds of each of `keys`."""
  from common.scaling.intervals import t_interval
  out = []
  for family in FAMILIES:
    for d_model in sorted({r["d_model"] for r in rows}):
      group = [r for r in rows if r["family"] == family and r["d_model"] == d_model]
      if not group:
        continue
      mean = dict(family=family, d_model=d_model, budget=d_model, n=len(group), params=group[0]["params"])
      for k in keys:
        mean[k], mean[f"{k}_ci95"] = t_interval([r[k] for r in group])
      out.append(mean)
  return out


def tables(rows: list[dict], shots) -> tuple[list[str], dict]:
  from common.scaling.frontier import fit_loss_vs_compute, frontier
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
  lines += ["| MoE d_model | MoE train FLOPs | dense/MoE compute at equal in-domain loss | "
            "at equal out-of-domain loss | seeds |", "|---|---|---|---|---|"]
  equivalence = dict(in_domain=summarize(rows), out_of_domain=summarize(rows, "ood_loss"))
  for ind, ood in zip(equivalence["in_domain"], equivalence["out_of_domain"]):
    lines.append(f"| {ind['d_model']} | {ind['flops']:.3g} | {format_pm(ind['factor'], ind['ci95'], '.2f')}x | "
                 f"{format_pm(ood['factor'], ood['ci95'], '.2f')}x | {ind['n']} |")
  return lines, dict(means=means, fits=fits, equivalence=equivalence)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/moe_scaling")
  p.add_argument("--sizes", default="32,64,96", help="d_model of each budget (3+ for the E term of the fit)")
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--mode", default="capacity", choices=("capacity", "dropless"))
  p.add_argument("--pairing", default="flops", choices=("flops", "shape"))
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--shots", default="0,4", help="priming shot counts")
  p.add_argument("--priming_n", type=int, default=32, help="questions per priming task and shot count")
  p.add_argument("--eval_rows", type=int, default=64, help="rows of 128 bytes scored per domain")
  p.add_argument("--user_glob", default="", help="text files scored as a further out-of-domain set")
  a = p.parse_args(argv)
  sizes = [int(s) for s in a.sizes.split(",")]
  a.shots = tuple(int(s) for s in a.shots.split(","))
  if len(sizes) < 2:
    p.error("--sizes needs at least two sizes (three or more for the E term of the fit)")
  if a.steps < 1 or a.seeds < 1:
    p.error("--steps and --seeds must be positive")
  os.makedirs(a.out, exist_ok=True)
  rows = []
  for seed in range(a.seeds):
    for d_model in sizes:
      for family in FAMILIES:
        row = train_and_score(family, d_model, seed, a)
        if row["status"] != 0:
          print(f"{family} d_model={d_model} seed={seed} stopped with status {row['status']}; rerun to resume")
          return row["status"]
        rows.append(row)
  lines, summary = tables(rows, a.shots)
  with open(os.path.join(a.out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(dict(args=vars(a), runs=rows, **summary), f, indent=1)
  from common.scaling import plots
  means = summary["means"]
  plots.compute_equivalence([m for m in means if m["family"] == "moe"], [m for m in means if m["family"] == "dense"],
                            os.path.join(a.out, "loss_vs_compute.png"), label_a="moe", label_b="dense",
                            loss_key="in_loss")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
