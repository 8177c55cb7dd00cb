"""`python -m blt.reproduce [--out=runs/blt_reproduce] [--budget=FLOPS] [--seeds=N] [--arms=...] [--quick]`

The comparison of Pagnoni et al. 2024 (fig. 1 and sec. 5: FLOP-controlled BLT vs token models) in miniature, on
the embedded corpus: at one training-FLOP budget, train
  byte            a dense transformer on bytes,
  bpe             the same transformer on a SentencePiece BPE vocabulary trained here (common.data.train_tokenizer),
  space           a BLT with space patching whose latent transformer is that same transformer body,
  entropy P=...   the same BLT with entropy patching at two mean patch sizes (`--entropy_sizes`): the entropy
                  model is trained first (`python -m blt.train_entropy`), then θ is calibrated for each size
                  (`blt.calibrate.calibrate_threshold`),
and compare them by bits per byte on the same held-out bytes. The configs are blt/configs/reproduce.py.

FLOP matching: each run gets round(budget / FLOPs-per-step) steps, FLOPs-per-step from common.flops (3 x the
forward of the trained model per position, plus for entropy patching the entropy model's forward on every
training byte). A BLT's count depends on its mean patch size, which is measured on training rows through the
trainer's own patching before the steps are chosen.

Bits per byte: every run is evaluated on the whole held-out split (the same documents for every vocabulary), and
bpb = total nats / (ln 2 x bytes of that text), so a BPE model and a byte model are scored on the same bytes
(end-of-document predictions included for all). Inference FLOPs per byte: the forward of the model (and of the
entropy model, for entropy patching) per held-out byte, BLT patch size taken from its final eval.

Writes OUT/results.md (table), OUT/results.json and OUT/bpb_vs_flops.png (every eval of every run, bpb against
the training FLOPs spent so far). With --seeds N each run is repeated with seeds 0..N-1 and figures are the
mean with a 95% t-interval (common.scaling.intervals). Rerunning skips finished runs and resumes interrupted
ones (each run is a workdir of the shared trainer under OUT/runs/).

Time: measured, `--budget=2e12` (1 seed) took 58 minutes of wall time and about 1,150 CPU-seconds (all
processes) on the 2-core CPU while it was shared with other jobs (load average ~15). Steps and evals scale
linearly with the budget, so the default (DEFAULT_BUDGET = 6e12, 3x) is estimated at 30-55 minutes on an idle
2-core CPU (3 x those CPU-seconds spread over one to two busy cores); it has not been run. `--quick` is a smoke
run (tiny models, a few steps each).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

from common.scaling.runs import finished, format_pm, read_metrics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "reproduce.py")
ENTROPY_CONFIG = os.path.join(HERE, "configs", "entropy_tiny.py")
DEFAULT_BUDGET = 6e12
QUICK_BUDGET = 2e9
EVALS_PER_RUN = 4
PATCH_SAMPLE_ROWS = 64
ARMS = ("byte", "bpe", "space", "entropy")
# --quick: a few steps of a tiny entropy model (blt/configs/entropy_tiny.py keys, common trainer schedule).
QUICK_ENTROPY_OVERRIDES = ("train.steps=4", "train.warmup_steps=1", "eval.every_steps=4", "eval.batches=1",
                           "checkpoint.every_steps=4", "log.every_steps=2", "data.seq_len=64",
                           "data.max_train_bytes=60000", "data.max_eval_bytes=6000")


def _log(msg: str) -> None:
  print(f"[blt.reproduce] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class Run:
  """One arm at one seed: `label` names it in tables, `arm` picks the config, `target` the entropy patch size."""
  label: str
  arm: str
  seed: int
  target: float = 0.0

  @property
  def name(self) -> str:
    return f"{self.label.replace(' ', '').replace('=', '')}_s{self.seed}"


def steps_for_budget(budget: float, flops_per_step: float) -> int:
  """The step count whose training FLOPs are nearest the budget (at least one step)."""
  return max(1, round(budget / flops_per_step))


# ------------------------------------------------------------------------------------- shared artefacts


def tokenizer(out: str, vocab_size: int, data_cfg) -> str:
  """The BPE vocabulary of the `bpe` arm, trained once on the same training files as the LMs."""
  from common.data import train_tokenizer
  path = os.path.join(out, "tokenizer", f"bpe{vocab_size}.model")
  if not os.path.exists(path):
    _log(f"training a {vocab_size}-piece BPE tokenizer -> {path}")
    train_tokenizer.train(path, vocab_size=vocab_size, max_bytes=int(data_cfg.max_train_bytes))
  return path


def tokens_per_byte(spm_model: str, data_cfg) -> float:
  """Tokens (EOS included, as packed) per text byte of the training documents, to size BPE rows."""
  import sentencepiece as spm
  from common.data import corpus
  sp = spm.SentencePieceProcessor(model_file=spm_model)
  root, rels = corpus.list_documents(data_cfg, "train")
  tokens = n_bytes = 0
  for rel in rels:
    text = corpus.read_text(os.path.join(root, rel))
    tokens += len(sp.encode(text)) + 1
    n_bytes += len(text.encode("utf-8"))
  return tokens / n_bytes


def entropy_model(out: str, quick: bool, cache_dir: str) -> str:
  """Trains the entropy model once with its own trainer (a subprocess: the command a user would type)."""
  workdir = os.path.join(out, "entropy_model")
  if not finished(workdir):
    cmd = [sys.executable, "-m", "blt.train_entropy", f"--config={ENTROPY_CONFIG}", f"--workdir={workdir}"]
    cmd += [f"--config.{kv}" for kv in QUICK_ENTROPY_OVERRIDES] if quick else []
    cmd += [f"--config.data.cache_dir={cache_dir}"] if cache_dir else []
    _log("training the entropy model: " + " ".join(cmd[1:]))
    status = subprocess.run(cmd, check=False, cwd=os.path.dirname(HERE)).returncode
    if status != 0:
      raise SystemExit(f"[blt.reproduce] the entropy model's training stopped with status {status} ({workdir})")
  return workdir


def entropy_model_config(workdir: str):
  """The resolved config of the entropy model's run (its FLOPs per byte are counted from `model`)."""
  import ml_collections
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def threshold_for(out: str, run_cfg, target: float) -> float:
  """θ (nats) whose mean patch size on the first training rows of `run_cfg` (an entropy arm's config) is
  `target` (blt.calibrate, the global rule, with the arm's max_patch_length), cached in OUT/thresholds.json."""
  path = os.path.join(out, "thresholds.json")
  table = {}
  if os.path.exists(path):
    with open(path) as f:
      table = json.load(f)
  key = f"{target:g}"
  if key not in table:
    from blt.calibrate import calibrate_threshold, sample_patching_inputs
    from blt.entropy import EntropyScorer, load_entropy_model
    from blt.train import PatchingData
    from common.data import LMData
    p = run_cfg.model.patching
    scorer = EntropyScorer(load_entropy_model(p.entropy_model)[0])
    data = PatchingData(LMData(run_cfg.data, batch_size=int(run_cfg.train.batch_size), seed=0), entropy_scorer=scorer)
    sample = sample_patching_inputs(data)
    theta, achieved = calibrate_threshold(sample["entropies"], target, max_patch_length=int(p.max_patch_length),
                                          segment_ids=sample["segment_ids"], positions=sample["positions"])
    table[key] = round(float(theta), 4)
    _log(f"calibrated θ = {table[key]:.4f} nats: mean patch size {achieved:.2f} bytes (target {target:g})")
    with open(path, "w") as f:
      json.dump(table, f, indent=1)
  return table[key]


# ----------------------------------------------------------------------------------------------- runs


def run_config(run: Run, ctx: dict):
  """The trainer config of `run` before its steps are set (blt/configs/reproduce.py)."""
  from common.config import load
  args = dict(arm=run.arm, scale=ctx["scale"])
  if run.arm == "bpe":
    args.update(spm_model=ctx["spm_model"], seq_len=str(ctx["bpe_seq_len"]))
  if run.arm == "entropy":
    args.update(entropy_model=ctx["entropy_workdir"], threshold=repr(ctx["thresholds"].get(run.target, 0.0)))
  cfg = load(CONFIG + ":" + ",".join(f"{k}={v}" for k, v in args.items()))
  cfg.train.seed = run.seed
  cfg.data.cache_dir = ctx["cache_dir"] or cfg.data.cache_dir
  cfg.log.progress = "lines"
  return cfg


def make_task(cfg):
  if cfg.model.name == "blt":
    from blt.train import make_task as blt_task
    return blt_task(cfg)
  from common.tasks.lm import lm_task
  return lm_task(cfg)


def measure_patch_size(cfg, rows: int = PATCH_SAMPLE_ROWS) -> float:
  """Mean bytes per patch on the first training rows, through the trainer's own loss (so through exactly the
  patching it trains with); the BLT's parameters do not move the boundaries, so an untrained one serves."""
  from flax import nnx
  task = make_task(cfg)
  model = task.build_model()
  loss = nnx.jit(task.loss_fn)
  n_bytes = n_patches = 0.0
  for position in range(0, rows, int(cfg.train.batch_size)):
    _, weight, extra = loss(model, task.data.train_batch(position))
    n_bytes, n_patches = n_bytes + float(weight), n_patches + float(extra["patches_per_byte"])
  return n_bytes / n_patches


def count_params(task) -> int:
  import jax
  from flax import nnx
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(task.build_model), nnx.Param))))


def positions_per_byte(data) -> float:
  """Scored positions (tokens or bytes, end-of-document ids included) per byte of the held-out text."""
  return sum(float(b["loss_mask"].sum()) for b in data.eval_batches(0)) / data.eval_bytes


def run_one(run: Run, ctx: dict, budget: float) -> dict:
  """Trains (or resumes, or skips) one run; returns its record."""
  from common.flops import blt_inference_flops_per_byte, flops_for, training_flops_per_token
  from common.train.loop import train
  workdir = os.path.join(ctx["out"], "runs", run.name)
  record_path = os.path.join(workdir, "reproduce.json")
  if os.path.exists(record_path) and finished(workdir):
    with open(record_path) as f:
      return json.load(f)
  cfg = run_config(run, ctx)
  seq_len, batch = int(cfg.data.seq_len), int(cfg.train.batch_size)
  entropy_cfg = ctx["entropy_cfg"].model if run.arm == "entropy" else None
  if cfg.model.name == "blt":
    cfg.model.patching.patch_size = round(measure_patch_size(cfg), 3)
  task = make_task(cfg)  # resolves model.vocab_size for the dense LMs
  flops_per_step = training_flops_per_token(cfg.model, seq_len) * seq_len * batch
  if entropy_cfg is not None:  # the entropy model runs forward over every training byte
    flops_per_step += flops_for(entropy_cfg, seq_len).forward * seq_len * batch
  steps = steps_for_budget(budget, flops_per_step)
  every = max(1, math.ceil(steps / EVALS_PER_RUN))
  cfg.train.steps = steps
  cfg.train.warmup_steps = min(int(cfg.train.warmup_steps), max(1, steps // 10))
  cfg.eval.every_steps = cfg.checkpoint.every_steps = every
  cfg.log.every_steps = max(1, min(10, every))
  _log(f"{run.label} seed {run.seed}: {steps} steps x {flops_per_step:.3g} FLOPs = {steps * flops_per_step:.3g} "
       f"(budget {budget:.3g}) -> {workdir}")
  start = time.time()
  status = train(cfg, workdir, task)
  if status != 0:
    raise SystemExit(f"[blt.reproduce] {run.label} seed {run.seed} stopped with status {status} ({workdir})")
  per_byte = positions_per_byte(task.data)
  evals = [m for m in read_metrics(workdir) if "eval/loss" in m]
  final = evals[-1]
  if cfg.model.name == "blt":
    patch_size = float(final["eval/bytes_per_patch"])
    measured = cfg.model.copy_and_resolve_references()
    measured.patching.patch_size = patch_size
    inference = blt_inference_flops_per_byte(measured, seq_len, entropy_model_cfg=entropy_cfg) * per_byte
  else:
    patch_size = 1.0 / per_byte
    inference = flops_for(cfg.model, seq_len).forward * per_byte
  to_bpb = per_byte / math.log(2)  # nats per scored position -> bits per held-out byte
  record = dict(
      label=run.label, arm=run.arm, seed=run.seed, target_patch_size=run.target or None, steps=steps,
      params=count_params(task), flops_per_step=flops_per_step, train_flops=steps * flops_per_step,
      inference_flops_per_byte=inference, patch_size=patch_size, bpb=float(final["eval/loss"]) * to_bpb,
      curve=[[m["step"] * flops_per_step, m["eval/loss"] * to_bpb] for m in evals],
      wall_s=time.time() - start)
  with open(record_path, "w") as f:
    json.dump(record, f, indent=1)
  _log(f"{run.label} seed {run.seed}: bpb {record['bpb']:.4f}, patch size {patch_size:.2f}, "
       f"{record['wall_s']:.0f}s")
  return record


# --------------------------------------------------------------------------------------------- report


def summarize(records: list[dict]) -> list[dict]:
  """One row per label: figures equal across seeds as they are, bpb and patch size as mean ± 95% half-width."""
  from common.scaling.intervals import t_interval
  rows = []
  for label in dict.fromkeys(r["label"] for r in records):
    group = [r for r in records if r["label"] == label]
    row = {k: group[0][k] for k in ("label", "arm", "target_patch_size", "steps", "params", "train_flops")}
    row["seeds"] = len(group)
    for key in ("bpb", "patch_size", "inference_flops_per_byte"):
      row[key], row[f"{key}_ci95"] = t_interval([r[key] for r in group])
    rows.append(row)
  return rows


def markdown(rows: list[dict], budget: float, notes: list[str]) -> str:
  lines = [f"Training budget {budget:.3g} FLOPs per model; bpb on the same held-out bytes; "
           f"{rows[0]['seeds'] if rows else 0} seed(s), ± = 95% t-interval over seeds.", "",
           "| model | params | steps | training FLOPs | inference FLOPs / byte | mean patch size (bytes) | eval bpb |"
           " seeds |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f} M | {r['steps']} | {r['train_flops']:.3g} | "
                 f"{format_pm(r['inference_flops_per_byte'], r['inference_flops_per_byte_ci95'], '.3g')} | "
                 f"{format_pm(r['patch_size'], r['patch_size_ci95'], '.2f')} | {format_pm(r['bpb'], r['bpb_ci95'], '.4f')} | "
                 f"{r['seeds']} |")
  return "\n".join(lines + [""] + notes) + "\n"


def plot(records: list[dict], path: str) -> str:
  """bpb against training FLOPs spent, one line per model (mean over seeds at each eval)."""
  import numpy as np
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.5, 4.5))
  ax = fig.add_subplot()
  for label in dict.fromkeys(r["label"] for r in records):
    curves = [np.asarray(r["curve"]) for r in records if r["label"] == label]
    n = min(len(c) for c in curves)
    mean = np.mean([c[:n] for c in curves], axis=0)
    ax.plot(mean[:, 0], mean[:, 1], "o-", label=label)
  ax.set(xscale="log", xlabel="training FLOPs", ylabel="eval bits per byte", title="BLT vs byte and BPE models")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


# ----------------------------------------------------------------------------------------------- main


def plan(arms: list[str], seeds: int, entropy_sizes: list[float]) -> list[Run]:
  runs = []
  for seed in range(seeds):
    for arm in arms:
      if arm == "entropy":
        runs += [Run(f"entropy P={size:g}", "entropy", seed, size) for size in entropy_sizes]
      else:
        runs.append(Run(arm, arm, seed))
  return runs


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m blt.reproduce", description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/blt_reproduce")
  p.add_argument("--budget", type=float, default=0.0, help=f"training FLOPs per model (default {DEFAULT_BUDGET:g}; "
                 f"--quick: {QUICK_BUDGET:g})")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--arms", default=",".join(ARMS), help="a subset of " + ",".join(ARMS))
  p.add_argument("--entropy_sizes", default="4.5,8", help="the two target mean patch sizes of entropy patching")
  p.add_argument("--bpe_vocab", type=int, default=0, help="BPE pieces (default 1024; --quick: 320)")
  p.add_argument("--cache_dir", default="", help="packed-data cache (default: data.cache_dir of the config)")
  p.add_argument("--quick", action="store_true", help="tiny models, a few steps each: a smoke run")
  a = p.parse_args(argv)
  arms = [x for x in a.arms.split(",") if x]
  if not arms or set(arms) - set(ARMS):
    p.error(f"--arms={a.arms}: expected a comma-separated subset of {','.join(ARMS)}")
  if a.seeds < 1:
    p.error(f"--seeds={a.seeds}: must be >= 1")
  budget = a.budget or (QUICK_BUDGET if a.quick else DEFAULT_BUDGET)
  if budget <= 0:
    p.error(f"--budget={a.budget}: must be positive")
  sizes = [float(x) for x in a.entropy_sizes.split(",") if x]
  os.makedirs(a.out, exist_ok=True)
  ctx = dict(out=a.out, scale="quick" if a.quick else "tiny", cache_dir=a.cache_dir, thresholds={})
  data_cfg = run_config(Run("byte", "byte", 0), ctx).data
  notes = []
  if "bpe" in arms:
    ctx["spm_model"] = tokenizer(a.out, a.bpe_vocab or (320 if a.quick else 1024), data_cfg)
    rate = tokens_per_byte(ctx["spm_model"], data_cfg)
    ctx["bpe_seq_len"] = max(8, round(int(data_cfg.seq_len) * rate))
    notes.append(f"bpe: {os.path.basename(ctx['spm_model'])}, {1 / rate:.2f} bytes per token on the training "
                 f"text, rows of {ctx['bpe_seq_len']} tokens (~{int(data_cfg.seq_len)} bytes, as the byte rows).")
  if "entropy" in arms:
    ctx["entropy_workdir"] = entropy_model(a.out, a.quick, a.cache_dir)
    ctx["entropy_cfg"] = entropy_model_config(ctx["entropy_workdir"])
    probe = run_config(Run("entropy", "entropy", 0), ctx)
    for size in sizes:
      ctx["thresholds"][size] = threshold_for(a.out, probe, size)
    e = ctx["entropy_cfg"]
    from common.flops import training_flops_per_token
    e_flops = training_flops_per_token(e.model, int(e.data.seq_len)) * int(e.data.seq_len) * int(
        e.train.batch_size) * int(e.train.steps)
    notes.append(f"entropy model: trained once for {e_flops:.3g} FLOPs (shared by the entropy runs, not in their "
                 f"budget); its forward on every byte is in their training and inference FLOPs; thresholds "
                 + ", ".join(f"P={s:g}: θ={ctx['thresholds'][s]:.3f} nats" for s in sizes) + ".")
  records = []
  for run in plan(arms, a.seeds, sizes):
    records.append(run_one(run, ctx, budget))
  rows = summarize(records)
  table = markdown(rows, budget, notes)
  with open(os.path.join(a.out, "results.md"), "w") as f:
    f.write(table)
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(dict(budget=budget, seeds=a.seeds, summary=rows, runs=records, notes=notes), f, indent=1)
  plot(records, os.path.join(a.out, "bpb_vs_flops.png"))
  print(table, flush=True)
  _log(f"wrote {a.out}/results.md, results.json, bpb_vs_flops.png")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
