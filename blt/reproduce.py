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

Bits per byte, as `blt.train` defines it (its module docstring): every run is evaluated on the whole held-out
split (the same documents for every vocabulary), and bpb = total nats / (ln 2 x bytes of that text),
end-of-document predictions included for all, so a BPE model and a byte model are scored on the same bytes; for
the byte and BLT runs this is their `eval/bpb`. Inference FLOPs per byte: the forward of the model (and of the
entropy model, for entropy patching) per held-out byte, BLT patch size taken from its final eval.

Runs on the shared harness (common.reproduce): OUT/results.md, OUT/results.json (read by notebooks/blt.ipynb)
and OUT/bpb_vs_flops.png (bpb against the training FLOPs spent so far); --seeds N (default 3) repeats each
run with seeds 0..N-1, figures are the mean with a 95% t-interval; finished runs are skipped, interrupted ones
resume; --emit_commands prints the trainer commands (the entropy arms' once the entropy model exists).

Time: measured, `--budget=2e12` (1 seed) took 58 minutes of wall time and about 1,150 CPU-seconds (all
processes) on the 2-core CPU while it was shared with other jobs (load average ~15). Steps and evals scale
linearly with the budget, so the default (DEFAULT_BUDGET = 6e12, 3x) is estimated at 30-55 minutes per seed on an
idle 2-core CPU (3 x those CPU-seconds spread over one to two busy cores); it has not been run. `--quick` is a
smoke run (tiny models, a few steps each).

Patch-size trend at fixed inference FLOPs (the paper's fig. 1 right, sec. 5.2): `--trend=8` adds, for each size
P, the entropy BLT calibrated to P with its latent transformer deepened to the most layers whose inference FLOPs
per byte (entropy model included, at the target P) stay within those of the first `--entropy_sizes` arm (P=4.5
with the body's depth), at the same training budget: bigger patches buy a bigger global model at equal inference
cost. Its rows follow the main table's.

Ablations (the paper's sec. 7 in miniature): `--ablations=no_hash,pool_only,...` adds, for each name of
blt/configs/reproduce.py's ABLATIONS, the space BLT with that one switch changed, at the same budget; they form
the second table of results.md beside the space BLT as it is.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import ml_collections
import sentencepiece as spm
from flax import nnx

from blt import calibrate
from blt import data as blt_data
from blt import train as blt_train
from blt.configs.reproduce import ABLATIONS
from common import reproduce
from common.data import LMData, corpus, train_tokenizer
from common.flops import blt_inference_flops_per_byte, flops_for, training_flops_per_token
from common.scaling.runs import finished, format_pm, read_metrics
from common.tasks import lm

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "reproduce.py")
ENTROPY_CONFIG = os.path.join(HERE, "configs", "entropy_tiny.py")
DEFAULT_BUDGET = 6e12
QUICK_BUDGET = 2e9
EVALS_PER_RUN = 4
PATCH_SAMPLE_ROWS = 64
ARMS = ("byte", "bpe", "space", "entropy")
# The paper's finding for each arm (fig. 1, sec. 5: FLOP-controlled scaling up to 8B parameters).
PAPER = {"byte": "byte-level transformers trail BPE at equal FLOPs",
         "bpe": "the reference (Llama 2/3 BPE)",
         "space": "BLT-Space: near BPE, behind BLT-Entropy",
         "entropy": "BLT-Entropy matches BPE; larger patches cut inference FLOPs (up to 50%)"}
TREND_PAPER = "at fixed inference FLOPs, larger patches and a larger global model overtake BPE (fig. 1 right)"
# The paper's finding for each ablation (sec. 7, at 1B scale).
ABLATION_PAPER = {"no_hash": "hash n-gram embeddings lower bpb; dropping them costs most of the ablations",
                  "hash3": "the official code's 3 functions per n (the paper's tables vary n and table size)",
                  "pool_only": "encoder cross-attention (vs pooling alone) lowers bpb",
                  "dec_first": "decoder cross-attention in every layer is best",
                  "k2": "more query slots per patch (k) help the encoder's cross-attention",
                  "own_patch": "the paper's FLOP count (m = k); not ablated for bpb in the paper"}
# --quick: a few steps of a tiny entropy model (blt/configs/entropy_tiny.py keys, common trainer schedule).
QUICK_ENTROPY_OVERRIDES = ("train.steps=4", "train.warmup_steps=1", "eval.every_steps=4", "eval.batches=1",
                           "checkpoint.every_steps=4", "log.every_steps=2", "data.seq_len=64",
                           "data.max_train_bytes=60000", "data.max_eval_bytes=6000")


def steps_for_budget(budget: float, flops_per_step: float) -> int:
  """The step count whose training FLOPs are nearest the budget (at least one step)."""
  return max(1, round(budget / flops_per_step))


def trend_layers(entropy_arm_cfg, reference_size: float, size: float, entropy_model_cfg) -> int:
  """The most latent-transformer layers whose inference FLOPs per byte at mean patch size `size` stay within
  those of `entropy_arm_cfg` (its own depth) at `reference_size` (blt_inference_flops_per_byte, entropy model
  included)."""
  seq_len = int(entropy_arm_cfg.data.seq_len)

  def at(layers: int, patch_size: float) -> float:
    m = entropy_arm_cfg.model.copy_and_resolve_references()
    m.n_layers_global, m.patching.patch_size = layers, patch_size
    return blt_inference_flops_per_byte(m, seq_len, entropy_model_cfg=entropy_model_cfg)

  layers = int(entropy_arm_cfg.model.n_layers_global)
  budget = at(layers, reference_size)
  while at(layers + 1, size) <= budget:
    layers += 1
  return layers


def arm_list(arms: list[str], entropy_sizes: list[float], config_args: dict[str, str],
             ablations: list[str] = (), trend: dict[float, int] | None = None) -> list[reproduce.Arm]:
  """The runs' arms: one per name in `arms`, entropy once per target patch size, then the space BLT once per
  ablation. `config_args` are the blt/configs/reproduce.py arguments shared by all (scale) or of one arm (bpe:
  spm_model, seq_len; entropy: entropy_model, threshold_<size>); `trend` maps a patch size to the latent depth
  of its trend arm (`trend_layers`)."""
  out = []
  for arm in arms:
    for size in entropy_sizes if arm == "entropy" else [None]:
      label = arm if size is None else f"entropy P={size:g}"
      args = dict(arm=arm, scale=config_args["scale"])
      if arm == "bpe":
        args.update(spm_model=config_args["spm_model"], seq_len=config_args["bpe_seq_len"])
      if arm == "entropy":
        args.update(entropy_model=config_args["entropy_model"], threshold=config_args.get(f"threshold_{size:g}", 0.0))
      trainer = "common.train" if arm in ("byte", "bpe") else "blt.train"
      out.append(reproduce.Arm(label.replace(" ", "").replace("=", ""), label,
                               CONFIG + ":" + ",".join(f"{k}={v}" for k, v in args.items()), trainer, PAPER[arm],
                               dict(arm=arm, target_patch_size=size)))
  for size, layers in (trend or {}).items():
    args = dict(arm="entropy", scale=config_args["scale"], entropy_model=config_args["entropy_model"],
                threshold=config_args[f"threshold_{size:g}"], n_layers_global=layers)
    out.append(reproduce.Arm(f"trendP{size:g}_L{layers}", f"entropy P={size:g}, {layers} global layers",
                             CONFIG + ":" + ",".join(f"{k}={v}" for k, v in args.items()), "blt.train",
                             TREND_PAPER, dict(arm="entropy", target_patch_size=size, trend=True)))
  for name in ablations:
    args = dict(arm="space", scale=config_args["scale"], ablation=name)
    out.append(reproduce.Arm(f"space_{name}", f"space {name}", CONFIG + ":" + ",".join(
        f"{k}={v}" for k, v in args.items()), "blt.train", ABLATION_PAPER[name],
        dict(arm="space", target_patch_size=None, ablation=name)))
  return out


def make_task(cfg):
  """The BLT's task, or the dense LM's on its resolved config (model.vocab_size from the vocabulary)."""
  return blt_train.make_task(blt_train.resolve(cfg)) if cfg.model.name == "blt" else lm.lm_task(lm.resolve(cfg))


# ------------------------------------------------------------------------------------- shared artefacts


def tokenizer(out: str, vocab_size: int, data_cfg) -> str:
  """The BPE vocabulary of the `bpe` arm, trained once on the same training files as the LMs."""
  path = os.path.join(out, "tokenizer", f"bpe{vocab_size}.model")
  if not os.path.exists(path):
    train_tokenizer.train(path, vocab_size=vocab_size, max_bytes=int(data_cfg.max_train_bytes))
  return path


def tokens_per_byte(spm_model: str, data_cfg) -> float:
  """Tokens (EOS included, as packed) per text byte of the training documents, to size BPE rows."""
  sp = spm.SentencePieceProcessor(model_file=spm_model)
  root, rels = corpus.list_documents(data_cfg, "train")
  tokens = n_bytes = 0
  for rel in rels:
    text = corpus.read_text(os.path.join(root, rel))
    tokens += len(sp.encode(text)) + 1
    n_bytes += len(text.encode("utf-8"))
  return tokens / n_bytes


def entropy_command(workdir: str, quick: bool, cache_dir: str) -> list[str]:
  """The entropy model's own trainer command (the one a user would type)."""
  cmd = ["-m", "blt.train_entropy", f"--config={ENTROPY_CONFIG}", f"--workdir={workdir}"]
  cmd += [f"--config.{kv}" for kv in QUICK_ENTROPY_OVERRIDES] if quick else []
  return cmd + ([f"--config.data.cache_dir={cache_dir}"] if cache_dir else [])


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
    p = run_cfg.model.patching
    scorer = blt_train.entropy_scorer(p)
    data = blt_data.PatchingData(LMData(run_cfg.data, batch_size=int(run_cfg.train.batch_size), seed=0),
                                 entropy_scorer=scorer)
    sample = calibrate.sample_patching_inputs(data)
    theta, _ = calibrate.calibrate_threshold(sample["entropies"], target, max_patch_length=int(p.max_patch_length),
                                             segment_ids=sample["segment_ids"], positions=sample["positions"])
    table[key] = round(float(theta), 4)
    with open(path, "w") as f:
      json.dump(table, f, indent=1)
  return table[key]


# ----------------------------------------------------------------------------------------------- runs


def measure_patch_size(cfg, rows: int = PATCH_SAMPLE_ROWS) -> float:
  """Mean bytes per patch on the first training rows, through the trainer's own loss (so through exactly the
  patching it trains with); the BLT's parameters do not move the boundaries, so an untrained one serves."""
  task = make_task(cfg)
  model = task.build_model()
  loss = nnx.jit(task.loss_fn)
  n_bytes = n_patches = 0.0
  for position in range(0, rows, int(cfg.train.batch_size)):
    _, weight, extra = loss(model, task.data.train_batch(position))
    n_bytes, n_patches = n_bytes + float(weight), n_patches + float(extra["patches_per_byte"])
  return n_bytes / n_patches


def positions_per_byte(data) -> float:
  """Scored positions (tokens or bytes, end-of-document ids included) per byte of the held-out text."""
  return sum(float(b["loss_mask"].sum()) for b in data.eval_batches(0)) / data.eval_bytes


def summarize(records: list[dict]) -> list[dict]:
  """One row per label: figures equal across seeds as they are, bpb and patch size as mean ± 95% half-width."""
  rows = []
  for label in dict.fromkeys(r["label"] for r in records):
    group = [r for r in records if r["label"] == label]
    row = {k: group[0][k] for k in ("label", "arm", "target_patch_size", "steps", "params", "train_flops")}
    row.update(seeds=len(group), paper=group[0].get("paper") or PAPER[row["arm"]], ablation=group[0].get("ablation"))
    for key in ("bpb", "patch_size", "inference_flops_per_byte"):
      row[key], row[f"{key}_ci95"] = reproduce.t_interval([r[key] for r in group])
    rows.append(row)
  return rows


def markdown(rows: list[dict], budget: float, notes: list[str]) -> str:
  main = [r for r in rows if not r.get("ablation")]
  lines = [f"Training budget {budget:.3g} FLOPs per model; bpb on the same held-out bytes; "
           f"{rows[0]['seeds'] if rows else 0} seed(s), ± = 95% t-interval over seeds.", ""]
  lines += reproduce.table(
      ["model", "params", "steps", "training FLOPs", "inference FLOPs / byte", "mean patch size (bytes)", "eval bpb",
       "seeds"],
      [([r["label"], f"{r['params'] / 1e6:.2f} M", r["steps"], f"{r['train_flops']:.3g}",
         format_pm(r["inference_flops_per_byte"], r["inference_flops_per_byte_ci95"], ".3g"),
         format_pm(r["patch_size"], r["patch_size_ci95"], ".2f"), format_pm(r["bpb"], r["bpb_ci95"], ".4f"),
         r["seeds"]], r["paper"]) for r in main], paper="paper (fig. 1, up to 8B)")
  ablations = [r for r in rows if r.get("ablation")]
  if ablations:
    base = next((r for r in main if r["label"] == "space"), None)
    lines += ["", "Ablations of the space BLT (one switch each, same budget; Δ = its bpb minus the space BLT's):", ""]
    lines += reproduce.table(
        ["model", "params", "steps", "eval bpb", "Δ bpb", "seeds"],
        [([r["label"], f"{r['params'] / 1e6:.2f} M", r["steps"], format_pm(r["bpb"], r["bpb_ci95"], ".4f"),
           f"{r['bpb'] - base['bpb']:+.4f}" if base else "n/a", r["seeds"]], r["paper"]) for r in ablations],
        paper="paper (sec. 7)")
  return "\n".join(lines + [""] + notes) + "\n"


def plot(records: list[dict], path: str) -> str:
  """bpb against training FLOPs spent, one line per model (mean over seeds at each eval)."""
  labels = dict.fromkeys(r["label"] for r in records)
  lines = {label: ([r for r in records if r["label"] == label], "bpb") for label in labels}
  return reproduce.plot_curves({"BLT vs byte and BPE models": lines}, path, "eval bits per byte")


class Study(reproduce.Study):
  prog = "blt.reproduce"
  out = "runs/blt_reproduce"
  plot_name = "bpb_vs_flops.png"

  @classmethod
  def add_flags(cls, p) -> None:
    p.add_argument("--budget", type=float, default=0.0, help=f"training FLOPs per model (default "
                   f"{DEFAULT_BUDGET:g}; --quick: {QUICK_BUDGET:g})")
    p.add_argument("--arms", default=",".join(ARMS), help="a subset of " + ",".join(ARMS))
    p.add_argument("--ablations", default="", help="space BLT ablations to add, a subset of " + ",".join(ABLATIONS))
    p.add_argument("--trend", default="", help="patch sizes of the trend arms (entropy BLTs deepened to the "
                   "first entropy size's inference FLOPs per byte), e.g. 8")
    p.add_argument("--entropy_sizes", default="4.5,8", help="the two target mean patch sizes of entropy patching")
    p.add_argument("--bpe_vocab", type=int, default=0, help="BPE pieces (default 1024; --quick: 320)")

  def __init__(self, args):
    super().__init__(args)
    self.names = [x for x in args.arms.split(",") if x]
    self.ablations = [x for x in args.ablations.split(",") if x]
    self.trend_sizes = [float(x) for x in args.trend.split(",") if x]
    self.trend: dict[float, int] = {}
    self.sizes = [float(x) for x in args.entropy_sizes.split(",") if x]
    self.budget = args.budget or (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)
    self.config_args = dict(scale="quick" if args.quick else "tiny")
    self.notes: list[str] = []

  def check(self) -> str:
    if not self.names or set(self.names) - set(ARMS):
      return f"--arms={self.args.arms}: expected a comma-separated subset of {','.join(ARMS)}"
    if self.trend_sizes and "entropy" not in self.names:
      return f"--trend={self.args.trend}: needs the entropy arms (--arms with entropy), whose first size it matches"
    if set(self.ablations) - set(ABLATIONS):
      return f"--ablations={self.args.ablations}: expected a comma-separated subset of {','.join(ABLATIONS)}"
    return f"--budget={self.args.budget}: must be positive" if self.budget <= 0 else ""

  def prepare(self) -> None:
    """The BPE vocabulary, the entropy model and the θ of each entropy size (shared by all seeds)."""
    a, ctx = self.args, self.config_args
    data_cfg = self.base_config(dict(arm="byte", scale=ctx["scale"])).data
    if "bpe" in self.names:
      ctx["spm_model"] = tokenizer(a.out, a.bpe_vocab or (320 if a.quick else 1024), data_cfg)
      rate = tokens_per_byte(ctx["spm_model"], data_cfg)
      ctx["bpe_seq_len"] = max(8, round(int(data_cfg.seq_len) * rate))
      self.notes.append(f"bpe: {os.path.basename(ctx['spm_model'])}, {1 / rate:.2f} bytes per token on the "
                        f"training text, rows of {ctx['bpe_seq_len']} tokens (~{int(data_cfg.seq_len)} bytes, as "
                        "the byte rows).")
    if "entropy" in self.names:
      self.prepare_entropy(os.path.join(a.out, "entropy_model"))

  def prepare_entropy(self, workdir: str) -> None:
    a, ctx = self.args, self.config_args
    cmd = entropy_command(workdir, a.quick, a.cache_dir)
    if not finished(workdir) and a.emit_commands:  # the entropy arms need its checkpoint: a second stage
      print(" ".join(["python", *cmd]), flush=True)
      print("# rerun with --emit_commands once the entropy model has finished for the entropy arms' commands",
            file=sys.stderr)
      self.names.remove("entropy")
      return
    if not finished(workdir):
      self.log("training the entropy model: " + " ".join(cmd))
      status = subprocess.run([sys.executable, *cmd], check=False, cwd=os.path.dirname(HERE)).returncode
      if status != 0:
        raise SystemExit(f"[blt.reproduce] the entropy model's training stopped with status {status} ({workdir})")
    ctx["entropy_model"] = workdir
    probe = self.base_config(dict(arm="entropy", scale=ctx["scale"], entropy_model=workdir))
    for size in self.sizes + self.trend_sizes:
      ctx[f"threshold_{size:g}"] = threshold_for(a.out, probe, size)
    with open(os.path.join(workdir, "config.json")) as f:
      e = ml_collections.ConfigDict(json.load(f))
    self.entropy_cfg = e.model
    for size in self.trend_sizes:
      self.trend[size] = trend_layers(probe, self.sizes[0], size, e.model)
    e_flops = training_flops_per_token(e.model, int(e.data.seq_len)) * int(e.data.seq_len) * int(
        e.train.batch_size) * int(e.train.steps)
    self.notes.append(f"entropy model: trained once for {e_flops:.3g} FLOPs (shared by the entropy runs, not in "
                      "their budget); its forward on every byte is in their training and inference FLOPs; "
                      "thresholds " + ", ".join(f"P={s:g}: θ={ctx[f'threshold_{s:g}']:.3f} nats"
                                                for s in self.sizes + self.trend_sizes) + ".")

  def base_config(self, args: dict):
    arm = reproduce.Arm("probe", "probe", CONFIG + ":" + ",".join(f"{k}={v}" for k, v in args.items()), "")
    return super().config(arm, 0)

  def arms(self) -> list[reproduce.Arm]:
    return arm_list(self.names, self.sizes, self.config_args, self.ablations, self.trend)

  def flops_per_step(self, cfg) -> float:
    seq_len, batch = int(cfg.data.seq_len), int(cfg.train.batch_size)
    flops = training_flops_per_token(cfg.model, seq_len) * seq_len * batch
    if cfg.model.name == "blt" and cfg.model.patching.method == "entropy":  # its forward on every training byte
      flops += flops_for(self.entropy_cfg, seq_len).forward * seq_len * batch
    return flops

  def config(self, arm, seed):
    """The arm's config with its patch size measured and its steps matched to the budget."""
    cfg = super().config(arm, seed)
    if cfg.model.name == "blt":
      cfg.model.patching.patch_size = round(measure_patch_size(cfg), 3)
    if cfg.model.name != "blt":
      lm.resolve(cfg)  # model.vocab_size, which the FLOPs count
    reproduce.schedule(cfg, steps_for_budget(self.budget, self.flops_per_step(cfg)), EVALS_PER_RUN)
    return cfg

  make_task = staticmethod(make_task)

  def score(self, arm, cfg, task, workdir) -> dict:
    """bpb on the held-out bytes at every eval, inference FLOPs per byte at the measured patch size."""
    seq_len, flops_per_step, steps = int(cfg.data.seq_len), self.flops_per_step(cfg), int(cfg.train.steps)
    per_byte = positions_per_byte(task.data)
    evals = [m for m in read_metrics(workdir) if "eval/loss" in m]
    if cfg.model.name == "blt":
      patch_size = float(evals[-1]["eval/bytes_per_patch"])
      measured = cfg.model.copy_and_resolve_references()
      measured.patching.patch_size = patch_size
      entropy_cfg = self.entropy_cfg if cfg.model.patching.method == "entropy" else None
      inference = blt_inference_flops_per_byte(measured, seq_len, entropy_model_cfg=entropy_cfg) * per_byte
    else:
      patch_size = 1.0 / per_byte
      inference = flops_for(cfg.model, seq_len).forward * per_byte
    to_bpb = per_byte / math.log(2)  # nats per scored position -> bits per held-out byte
    self.log(f"{arm.label}: bpb {evals[-1]['eval/loss'] * to_bpb:.4f}, patch size {patch_size:.2f}")
    return dict(steps=steps, params=reproduce.count_params(task), flops_per_step=flops_per_step,
                train_flops=steps * flops_per_step, inference_flops_per_byte=inference, patch_size=patch_size,
                bpb=float(evals[-1]["eval/loss"]) * to_bpb,
                curves=dict(bpb=dict(flops=[m["step"] * flops_per_step for m in evals],
                                     values=[m["eval/loss"] * to_bpb for m in evals])))

  def report(self, records):
    rows = summarize(records)
    return markdown(rows, self.budget, self.notes), dict(budget=self.budget, summary=rows, notes=self.notes)

  plot = staticmethod(plot)


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
