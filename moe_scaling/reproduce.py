"""`python -m moe_scaling.reproduce [--out=runs/moe_scaling] [--sizes=32,48,64] [--steps=300] [--experts=8]
[--seeds=1]`: the paper's headline comparison in miniature (Artetxe et al. 2021, sec. 4, fig. 1/table 2).

For each size (one compute budget each: every model sees the same tokens, as in the paper), train the dense
model and its MoE partner, fit L(C) = E + K C^-gamma per family on validation cross-entropy against training
compute (common.scaling.frontier), and report the compute-equivalence factor: how much more compute the dense
law needs to reach each MoE model's loss (the paper: about 4x at modest budgets, narrowing at scale). With
--seeds N every run is repeated with N seeds; the table shows the mean factor and a 95% t-interval.
Writes table.md, results.json and loss_vs_compute.png into --out. Defaults finish in about an hour on a
2-core CPU; --steps/--sizes/--batch scale it.
"""
from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _final_eval(workdir: str, key: str = "eval/nll") -> float:
  value = math.nan
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        value = row[key]
  return value


def run_one(family: str, d_model: int, seed: int, a) -> dict:
  from common.flops import training_flops_per_token
  from common.train.loop import train
  from moe_scaling.configs.tiny import get_config
  from common.train.lm_task import lm_task
  cfg = get_config(f"family={family},d_model={d_model},experts={a.experts}")
  cfg.train.steps, cfg.train.seed, cfg.train.batch_size = a.steps, seed, a.batch
  cfg.eval.every_steps = cfg.checkpoint.every_steps = a.steps
  cfg.log.progress = "lines"
  workdir = os.path.join(a.out, f"{family}_d{d_model}_s{seed}")
  task = lm_task(cfg)
  status = train(cfg, workdir, task)
  tokens = a.steps * a.batch * cfg.data.seq_len
  return dict(family=family, d_model=d_model, seed=seed, budget=d_model, status=status,
              flops=training_flops_per_token(cfg.model, cfg.data.seq_len) * tokens, eval_loss=_final_eval(workdir))


def summarize(rows: list[dict]) -> list[dict]:
  """Per seed: the factor at each MoE point; then mean and 95% interval over seeds."""
  import numpy as np
  from scipy import stats
  from common.scaling.frontier import compute_equivalence
  per_size: dict[int, list[float]] = {}
  for seed in sorted({r["seed"] for r in rows}):
    moe = [r for r in rows if r["family"] == "moe" and r["seed"] == seed]
    dense = [r for r in rows if r["family"] == "dense" and r["seed"] == seed]
    for r, eq in zip(sorted(moe, key=lambda r: r["flops"]), compute_equivalence(moe, dense)):
      per_size.setdefault(r["d_model"], []).append(eq["factor"])
  out = []
  for d_model, factors in sorted(per_size.items()):
    f = np.asarray(factors)
    half = stats.t.ppf(0.975, len(f) - 1) * f.std(ddof=1) / math.sqrt(len(f)) if len(f) > 1 else math.nan
    out.append(dict(d_model=d_model, factor=float(f.mean()), ci95=float(half), n=len(f)))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/moe_scaling")
  p.add_argument("--sizes", default="32,48,64")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--seeds", type=int, default=1)
  a = p.parse_args(argv)
  sizes = [int(s) for s in a.sizes.split(",")]
  if len(sizes) < 2:
    p.error("--sizes needs at least two sizes (three or more for the E term of the fit)")
  rows = [run_one(fam, d, seed, a) for seed in range(a.seeds) for d in sizes for fam in ("dense", "moe")]
  summary = summarize(rows)
  os.makedirs(a.out, exist_ok=True)
  lines = ["| family | d_model | seed | train FLOPs | eval nll |", "|---|---|---|---|---|"]
  lines += [f"| {r['family']} | {r['d_model']} | {r['seed']} | {r['flops']:.3g} | {r['eval_loss']:.4f} |" for r in rows]
  lines += ["", "| MoE d_model | dense compute / MoE compute at equal loss | 95% interval | seeds |", "|---|---|---|---|"]
  lines += [f"| {s['d_model']} | {s['factor']:.2f} | ±{s['ci95']:.2f} | {s['n']} |" for s in summary]
  with open(os.path.join(a.out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(dict(runs=rows, equivalence=summary), f, indent=1)
  from common.scaling import plots
  plots.compute_equivalence([r for r in rows if r["family"] == "moe"], [r for r in rows if r["family"] == "dense"],
                            os.path.join(a.out, "loss_vs_compute.png"), label_a="moe", label_b="dense")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
