"""`python -m moma.reproduce [--out=runs/moma_reproduce] [--steps=N] [--seeds=N] [--variants=...] [--quick]`

The comparison of Lin et al. 2024 (MoMa, arXiv 2407.21770, table 2 and fig. 3) in miniature, on the embedded
mixed-modal data (Chameleon setting: captions and VQ image tokens in one sequence): train
  dense        the dense transformer,
  moe          a mixed-modal expert-choice MoE (every expert eligible for every token),
  moma         MoMa: text experts for text tokens, image experts for image tokens, expert choice in each group,
  moma_mod     MoMa with mixture-of-depths,
at the same FLOPs per token (moma/configs/common.py: each expert as wide as the dense FFN, expert choice with
c = 1 / E processes every token once on average; MoD's FLOPs are counted as they are, by common.flops) for the
same number of steps on the same batches, and report per-modality eval loss against training FLOPs and the
FLOPs savings at equal loss: the dense model's training FLOPs to reach its final loss over the variant's FLOPs
to reach that same loss (common.scaling.matching.compute_factor; below 1 when the variant is worse), overall
and for text and image targets. The paper, at 1.4B active parameters and 1T tokens: 3.7x overall (2.6x text,
5.2x image) for MoMa 4t4i, 3.0x for the mixed-modal MoE, 4.2x for MoMa + MoD.

Then the causal-inference gap: expert choice (and MoD) route each token by comparing it with the rest of the
batch, which decoding cannot do. For moma and moma_mod, auxiliary routers are trained on the frozen model
(`python -m moma.train_aux_routers`, moma/aux_routers.py) and the validation loss with their causal routing is
compared with the teacher-forced expert-choice loss.

Writes OUT/results.md (tables), OUT/results.json and OUT/loss_vs_flops.png (eval loss against training FLOPs per
modality, one line per variant). With --seeds N every run is repeated with seeds 0..N-1 (init and data order)
and each figure is the mean with a 95% t-interval (common.scaling.intervals). Runs live in OUT/runs/<variant>_s
<seed> (trainer workdirs): rerunning skips finished runs and resumes interrupted ones.

Time: see moma/README.md (measured for the reduced run there; the default is an extrapolation from it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "reproduce.py")
VARIANTS = ("dense", "moe", "moma", "moma_mod")
LABELS = {"dense": "dense", "moe": "mixed-modal EC MoE", "moma": "MoMa", "moma_mod": "MoMa + MoD"}
AUX_VARIANTS = ("moma", "moma_mod")
PARTS = ("overall", "text", "image")
PAPER_SAVINGS = {"moe": "3.0x", "moma": "3.7x (2.6x text, 5.2x image)", "moma_mod": "4.2x"}
DEFAULT_STEPS, QUICK_STEPS = 2000, 4
EVALS_PER_RUN = 10


def _log(msg: str) -> None:
  print(f"[moma.reproduce] {msg}", flush=True)


def eval_keys(rows: list[dict]) -> dict[str, str]:
  """The metrics.jsonl key of each part: cross-entropy without auxiliary losses (`eval/nll` when the task logs
  it, else `eval/loss`), `eval/loss_text`, `eval/loss_image`."""
  overall = "eval/nll" if any("eval/nll" in r for r in rows) else "eval/loss"
  return dict(overall=overall, text="eval/loss_text", image="eval/loss_image")


def run_config(variant: str, seed: int, a):
  from common.config import load
  cfg = load(f"{CONFIG}:variant={variant},scale={'quick' if a.quick else 'default'}")
  steps = a.steps or (QUICK_STEPS if a.quick else DEFAULT_STEPS)
  every = max(1, math.ceil(steps / EVALS_PER_RUN))
  cfg.train.update(steps=steps, seed=seed, warmup_steps=min(int(cfg.train.warmup_steps), max(1, steps // 10)))
  cfg.eval.every_steps = cfg.checkpoint.every_steps = every
  cfg.checkpoint.keep = 1
  cfg.log.update(progress="lines", every_steps=max(1, min(25, every)))
  if a.cache_dir:
    cfg.data.cache_dir = a.cache_dir
  if a.image_tokenizer:
    cfg.data.image_tokenizer = a.image_tokenizer
  if a.train_docs:
    cfg.data.n_train_docs = a.train_docs
  return cfg


def count_params(task) -> int:
  """Parameters of the model (all experts counted)."""
  import jax
  from flax import nnx
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(task.build_model), nnx.Param))))


def run_one(variant: str, seed: int, a) -> dict:
  """Trains (or resumes, or skips) one run, then for AUX_VARIANTS its aux routers; returns its record."""
  from common.scaling import runs
  from common.train.loop import train
  from moma.train import make_task
  workdir = os.path.join(a.out, "runs", f"{variant}_s{seed}")
  cfg = run_config(variant, seed, a)
  task = make_task(cfg)  # resolves model.vocab_size
  if not runs.finished(workdir):
    _log(f"{LABELS[variant]} seed {seed}: {cfg.train.steps} steps -> {workdir}")
    status = train(cfg, workdir, task)
    if status != 0:
      raise SystemExit(f"[moma.reproduce] {variant} seed {seed} stopped with status {status} ({workdir})")
  flops_per_step = task.train_flops_per_example * int(cfg.train.batch_size)
  keys = eval_keys(runs.read_metrics(workdir))
  curves = {part: runs.eval_curve(workdir, key, flops_per_step)._asdict() for part, key in keys.items()}
  record = dict(variant=variant, seed=seed, steps=int(cfg.train.steps), flops_per_step=flops_per_step,
                flops_per_token=task.train_flops_per_example / task.units_per_example, params=count_params(task),
                final={part: c["values"][-1] for part, c in curves.items()}, curves=curves,
                train_seconds=curves["overall"]["seconds"][-1])
  if variant in AUX_VARIANTS:
    record["aux"] = aux_result(workdir, cfg, a)
  return record


def aux_result(workdir: str, cfg, a) -> dict:
  """The aux routers' result of a run: read back when it was made with the same settings, else (re)made."""
  from moma import train_aux_routers
  steps = a.aux_steps or train_aux_routers.DEFAULT_STEPS
  eval_batches = a.aux_eval_batches or int(cfg.eval.batches)
  path = os.path.join(workdir, "aux_routers", "result.json")
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    if (result.get("steps"), result.get("eval_batches")) == (steps, eval_batches):
      return result
  return train_aux_routers.run(workdir, steps=steps, eval_batches=eval_batches)


# --------------------------------------------------------------------------------------------- report


def savings(records: list[dict]) -> dict[str, dict[str, list[float]]]:
  """Per variant and part, the FLOPs-savings factor of each seed against that seed's dense run."""
  from common.scaling.matching import compute_factor
  dense = {r["seed"]: r for r in records if r["variant"] == "dense"}
  out: dict[str, dict[str, list[float]]] = {}
  for r in records:
    if r["variant"] == "dense" or r["seed"] not in dense:
      continue
    base = dense[r["seed"]]["curves"]
    for part in PARTS:
      factor = compute_factor(base[part]["flops"], base[part]["values"], r["curves"][part]["flops"],
                              r["curves"][part]["values"])
      out.setdefault(r["variant"], {}).setdefault(part, []).append(factor)
  return out


def summarize(records: list[dict]) -> list[dict]:
  """One row per variant: losses, savings and causal gaps as mean and 95% half-width over seeds."""
  from common.scaling.intervals import t_interval
  factors = savings(records)
  rows = []
  for variant in dict.fromkeys(r["variant"] for r in records):
    group = [r for r in records if r["variant"] == variant]
    row = dict(variant=variant, label=LABELS[variant], seeds=len(group), steps=group[0]["steps"],
               params=group[0]["params"], flops_per_token=group[0]["flops_per_token"],
               train_flops=group[0]["flops_per_step"] * group[0]["steps"],
               train_seconds=t_interval([r["train_seconds"] for r in group]))
    for part in PARTS:
      row[f"loss_{part}"] = t_interval([r["final"][part] for r in group])
      if variant in factors:
        row[f"savings_{part}"] = t_interval(factors[variant][part])
    if all("aux" in r for r in group):
      for key in ("teacher_forced", "causal", "gap"):
        for part in PARTS:
          row[f"{key}_{part}"] = t_interval([r["aux"][key][part] for r in group])
      for key in ("bce", "accuracy", "mod_fraction", "threshold_gap_overall", "threshold_experts_per_token"):
        values = [r["aux"][key] for r in group if r["aux"].get(key) is not None]
        if values:
          row[f"aux_{key}"] = t_interval(values)
    rows.append(row)
  return rows


def markdown(rows: list[dict], command: str) -> str:
  from common.scaling.runs import format_pm
  pm = lambda pair, fmt: format_pm(pair[0], pair[1], fmt) if pair else "-"
  n_seeds = rows[0]["seeds"] if rows else 0
  lines = [f"`{command}`: {n_seeds} seed(s), ± = 95% t-interval over seeds. Loss: nats per target token on the "
           "validation split (text / image: targets of that modality).", "",
           "| model | params | train FLOPs / token | steps | eval loss (all / text / image) | FLOPs savings at equal "
           "loss: all | text | image | paper (1.4B, 1T tokens) |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    losses = " / ".join(pm(r[f"loss_{p}"], ".4f") for p in PARTS)
    saves = " | ".join(pm(r.get(f"savings_{p}"), ".2f") + ("x" if f"savings_{p}" in r else "") for p in PARTS)
    lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f} M | {r['flops_per_token']:.3g} | {r['steps']} | "
                 f"{losses} | {saves} | {PAPER_SAVINGS.get(r['variant'], '1x')} |")
  aux_rows = [r for r in rows if "causal_overall" in r]
  if aux_rows:
    lines += ["", "Causal inference with auxiliary routers (validation; teacher-forced = expert choice over the "
              "batch, causal = each token routed by the aux routers from its own state, top-1 of its group; "
              "MoD: p > 0.5):", "",
              "| model | teacher-forced loss (all / text / image) | causal loss (all / text / image) | gap (all / "
              "text / image) | aux BCE | aux accuracy | MoD tokens through | gap with p > 0.5 experts "
              "(experts / token) |", "|---|---|---|---|---|---|---|---|"]
    for r in aux_rows:
      tf, causal, gap = (" / ".join(pm(r[f"{k}_{p}"], ".4f") for p in PARTS) for k in ("teacher_forced", "causal",
                                                                                       "gap"))
      thr = (pm(r.get("aux_threshold_gap_overall"), ".4f") + " (" + pm(r.get("aux_threshold_experts_per_token"),
                                                                        ".2f") + ")")
      lines.append(f"| {r['label']} | {tf} | {causal} | {gap} | {pm(r.get('aux_bce'), '.4f')} | "
                   f"{pm(r.get('aux_accuracy'), '.3f')} | {pm(r.get('aux_mod_fraction'), '.3f')} | {thr} |")
  return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str) -> str:
  """Eval loss against training FLOPs, one panel per part, one line per variant (mean over seeds)."""
  import numpy as np
  from matplotlib.figure import Figure
  fig = Figure(figsize=(15, 4.2))
  for j, part in enumerate(PARTS):
    ax = fig.add_subplot(1, len(PARTS), j + 1)
    for variant in dict.fromkeys(r["variant"] for r in records):
      curves = [r["curves"][part] for r in records if r["variant"] == variant]
      n = min(len(c["values"]) for c in curves)
      if n == 0:
        continue
      flops = np.mean([c["flops"][:n] for c in curves], axis=0)
      loss = np.mean([c["values"][:n] for c in curves], axis=0)
      ax.plot(flops, loss, "o-", ms=3, label=LABELS[variant])
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="eval loss (nats / token)", title=part)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m moma.reproduce", description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/moma_reproduce")
  p.add_argument("--steps", type=int, default=0, help=f"training steps per run (default {DEFAULT_STEPS}; --quick: "
                 f"{QUICK_STEPS})")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--variants", default=",".join(VARIANTS), help="a subset of " + ",".join(VARIANTS))
  p.add_argument("--aux_steps", type=int, default=0, help="aux-router training steps (default: train_aux_routers')")
  p.add_argument("--aux_eval_batches", type=int, default=0, help="validation batches of the causal evaluation "
                 "(default: the run's eval.batches)")
  p.add_argument("--cache_dir", default="", help="data cache (default: data.cache_dir of the config)")
  p.add_argument("--train_docs", type=int, default=0, help="generated training documents (default: the config's, "
                 "16000; --quick: 200)")
  p.add_argument("--image_tokenizer", default="", help="workdir of a trained VQ tokenizer (default: the cached "
                 "tiny one, trained on first use)")
  p.add_argument("--quick", action="store_true", help="tiny models, a few steps each: a smoke run")
  a = p.parse_args(argv)
  variants = [v for v in a.variants.split(",") if v]
  if not variants or set(variants) - set(VARIANTS):
    p.error(f"--variants={a.variants}: expected a comma-separated subset of {','.join(VARIANTS)}")
  if a.seeds < 1 or min(a.steps, a.aux_steps, a.aux_eval_batches, a.train_docs) < 0:
    p.error("--seeds must be >= 1; --steps, --aux_steps, --aux_eval_batches and --train_docs >= 0")
  os.makedirs(a.out, exist_ok=True)
  records = [run_one(variant, seed, a) for seed in range(a.seeds) for variant in variants]
  rows = summarize(records)
  command = "python -m moma.reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
  table = markdown(rows, command.strip())
  with open(os.path.join(a.out, "results.md"), "w") as f:
    f.write(table)
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(dict(args=vars(a), summary=rows, runs=records), f, indent=1)
  plot(records, os.path.join(a.out, "loss_vs_flops.png"))
  print(table, flush=True)
  _log(f"wrote {a.out}/results.md, results.json, loss_vs_flops.png")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
