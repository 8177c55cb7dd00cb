"""`python -m moma.reproduce [--out=runs/moma_reproduce] [--steps=N] [--seeds=N] [--variants=...] [--quick]`

The comparison of Lin et al. 2024 (MoMa, arXiv 2407.21770, table 2 and fig. 3) in miniature, on the embedded
mixed-modal data (Chameleon setting: captions and VQ image tokens in one sequence): train
  dense        the dense transformer,
  moe          a mixed-modal expert-choice MoE (every expert eligible for every token),
  moma         MoMa: text experts for text tokens, image experts for image tokens, expert choice in each group,
  moma_mod     MoMa with mixture-of-depths,
at the same FLOPs per token (moma/configs/base.py: each expert as wide as the dense FFN, expert choice with
c = 1 / E processes every token once on average; MoD's FLOPs are counted as they are, by common.flops) for the
same number of steps on the same batches, and report per-modality eval loss against training FLOPs and the
FLOPs savings at equal loss: the dense model's training FLOPs to reach its final loss over the variant's FLOPs
to reach that same loss (common.scaling.matching.compute_factor; below 1 when the variant is worse), overall
and for text and image targets. The paper, at 1.4B active parameters and 1T tokens: 3.7x overall (2.6x text,
5.2x image) for MoMa 4t4i, 3.0x for the mixed-modal MoE, 4.2x for MoMa + MoD.

Those eval losses are teacher-forced and not causal: expert choice (and MoD) route each token by comparing it
with the rest of the batch, later tokens and other rows included, which decoding cannot do. So for every routed
variant auxiliary routers are trained on the frozen model (`python -m moma.train_aux_routers`,
moma/aux_routers.py) and the table has a causal column beside the teacher-forced one: the final validation loss
with each token routed by the aux routers from its own state (rule `aux_routers.DEFAULT_RULE`), and the FLOPs
savings at that loss (the dense model is causal as it is). A second table gives the gap, the routers' accuracy
and the other rule.

Runs on the shared harness (common.reproduce): OUT/results.md (tables), OUT/results.json (read by
notebooks/moma.ipynb) and OUT/loss_vs_flops.png (eval loss against training FLOPs per modality, one line per
variant). --seeds N (default 3; --quick: 1) repeats every run with seeds 0..N-1 (init and data order), each
figure the mean with a 95% t-interval. Runs live in OUT/runs/<variant>_s<seed> (trainer workdirs): rerunning
skips finished runs and resumes interrupted ones.

Time: see moma/README.md (measured for the reduced run there; the default is an extrapolation from it).
"""
from __future__ import annotations

import json
import os

from common import reproduce
from common.recipes import image_tokenizer
from common.scaling import runs
from common.scaling.matching import compute_factor
from common.scaling.runs import format_pm
from common.tasks import mixed_modal
from moma import train_aux_routers
from moma.aux_routers import DEFAULT_RULE as RULE, RULES
from moma.train import make_task

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "reproduce.py")
VARIANTS = ("dense", "moe", "moma", "moma_mod")
LABELS = {"dense": "dense", "moe": "mixed-modal EC MoE", "moma": "MoMa", "moma_mod": "MoMa + MoD"}
AUX_VARIANTS = ("moe", "moma", "moma_mod")
PARTS = ("overall", "text", "image")
OTHER_RULE = next(r for r in RULES if r != RULE)
RULE_NAMES = {"threshold": "every expert with p > 0.5", "top1": "top-1 expert of the group"}
PAPER_SAVINGS = {"dense": "1x", "moe": "3.0x", "moma": "3.7x (2.6x text, 5.2x image)", "moma_mod": "4.2x"}
DEFAULT_STEPS, QUICK_STEPS = 2000, 4
EVALS_PER_RUN = 10


def eval_keys(rows: list[dict]) -> dict[str, str]:
  """The metrics.jsonl key of each part: cross-entropy without auxiliary losses (`eval/nll` when the task logs
  it, else `eval/loss`), `eval/loss_text`, `eval/loss_image`."""
  overall = "eval/nll" if any("eval/nll" in r for r in rows) else "eval/loss"
  return dict(overall=overall, text="eval/loss_text", image="eval/loss_image")


def aux_result(workdir: str, cfg, a) -> dict:
  """The aux routers' result of a run: read back when it was made with the same settings and causal rule, else
  (re)made (the trained routers are resumed, only the evaluation reruns)."""
  steps = a.aux_steps or train_aux_routers.DEFAULT_STEPS
  eval_batches = a.aux_eval_batches or int(cfg.eval.batches)
  path = os.path.join(workdir, "aux_routers", "result.json")
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    if (result.get("steps"), result.get("eval_batches"), result.get("rule")) == (steps, eval_batches, RULE):
      return result
  return train_aux_routers.run(workdir, steps=steps, eval_batches=eval_batches)


def savings(records: list[dict], causal: bool = False) -> dict[str, dict[str, list[float]]]:
  """Per variant and part, the FLOPs-savings factor of each seed against that seed's dense run. `causal`: of the
  variant's final causal loss (aux routers) at its total FLOPs, a one-point curve: the dense FLOPs to reach it
  over the variant's when dense gets there, else dense's total over the variant's (a lower bound: the variant's
  causal loss is not measured earlier in training)."""
  dense = {r["seed"]: r for r in records if r["variant"] == "dense"}
  out: dict[str, dict[str, list[float]]] = {}
  for r in records:
    if r["variant"] == "dense" or r["seed"] not in dense or (causal and "aux" not in r):
      continue
    base = dense[r["seed"]]["curves"]
    for part in PARTS:
      flops, values = r["curves"][part]["flops"], r["curves"][part]["values"]
      if causal:
        flops, values = flops[-1:], [r["aux"]["causal"][part]]
      factor = compute_factor(base[part]["flops"], base[part]["values"], flops, values)
      out.setdefault(r["variant"], {}).setdefault(part, []).append(factor)
  return out


def summarize(records: list[dict]) -> list[dict]:
  """One row per variant: losses, savings and causal gaps as mean and 95% half-width over seeds."""
  t_interval = reproduce.t_interval
  factors, causal_factors = savings(records), savings(records, causal=True)
  rows = []
  for variant in dict.fromkeys(r["variant"] for r in records):
    group = [r for r in records if r["variant"] == variant]
    row = dict(variant=variant, label=LABELS[variant], seeds=len(group), steps=group[0]["steps"],
               params=group[0]["params"], flops_per_token=group[0]["flops_per_token"],
               train_flops=group[0]["flops_per_step"] * group[0]["steps"],
               train_seconds=t_interval([r["train_seconds"] for r in group]), paper=PAPER_SAVINGS[variant])
    for part in PARTS:
      row[f"loss_{part}"] = t_interval([r["final"][part] for r in group])
      if variant in factors:
        row[f"savings_{part}"] = t_interval(factors[variant][part])
      if variant in causal_factors:
        row[f"causal_savings_{part}"] = t_interval(causal_factors[variant][part])
    if all("aux" in r for r in group):
      for key in ("teacher_forced", "causal", "gap"):
        for part in PARTS:
          row[f"{key}_{part}"] = t_interval([r["aux"][key][part] for r in group])
      keys = dict(bce="bce", accuracy="accuracy", mod_fraction="mod_fraction",
                  experts_per_token=f"{RULE}_experts_per_token", other_gap_overall=f"{OTHER_RULE}_gap_overall",
                  other_experts_per_token=f"{OTHER_RULE}_experts_per_token")
      for name, key in keys.items():
        values = [r["aux"][key] for r in group if r["aux"].get(key) is not None]
        if values:
          row[f"aux_{name}"] = t_interval(values)
    rows.append(row)
  return rows


def markdown(rows: list[dict], command: str) -> str:
  pm = lambda pair, fmt: format_pm(pair[0], pair[1], fmt) if pair else "-"
  n_seeds = rows[0]["seeds"] if rows else 0
  losses = lambda r, key: " / ".join(pm(r.get(f"{key}_{p}"), ".4f") for p in PARTS)
  factors = lambda r, key: " / ".join(pm(r.get(f"{key}_{p}"), ".2f") + ("x" if f"{key}_{p}" in r else "")
                                      for p in PARTS)
  lines = [f"`{command}`: {n_seeds} seed(s), ± = 95% t-interval over seeds. Loss: nats per target token on the "
           "validation split (text / image: targets of that modality). Teacher-forced (not causal): the eval "
           "loss of training, each eval batch routed by expert choice and MoD top-k over the whole batch, later "
           "tokens and other rows included. Causal: the final loss with every token routed by auxiliary routers "
           f"from its own state ({RULE_NAMES[RULE]}; MoD: p > 0.5), and the FLOPs savings at that loss (dense FLOPs "
           "to reach it over the variant's total; when dense never gets there, dense's total over the variant's, "
           "a lower bound). The dense model is causal as it is.", ""]
  lines += reproduce.table(
      ["model", "params", "train FLOPs / token", "steps", "teacher-forced eval loss (all / text / image)",
       "FLOPs savings at equal teacher-forced loss: all", "text", "image", "causal eval loss (all / text / image)",
       "causal FLOPs savings (all / text / image)"],
      [([r["label"], f"{r['params'] / 1e6:.2f} M", f"{r['flops_per_token']:.3g}", r["steps"], losses(r, "loss"),
         *(pm(r.get(f"savings_{p}"), ".2f") + ("x" if f"savings_{p}" in r else "") for p in PARTS),
         losses(r, "loss" if r["variant"] == "dense" else "causal"), factors(r, "causal_savings")], r["paper"])
       for r in rows], paper="paper (1.4B, 1T tokens)")
  aux_rows = [r for r in rows if "causal_overall" in r]
  if aux_rows:
    lines += ["", f"Causal inference with auxiliary routers (validation; causal: {RULE_NAMES[RULE]}, MoD p > 0.5; "
              f"the other rule, {RULE_NAMES[OTHER_RULE]}, in the last column):", "",
              "| model | teacher-forced loss (all / text / image) | causal loss (all / text / image) | gap (all / "
              "text / image) | aux BCE | aux accuracy | MoD tokens through | experts / token | gap with the other "
              "rule (experts / token) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in aux_rows:
      other = (pm(r.get("aux_other_gap_overall"), ".4f") + " (" + pm(r.get("aux_other_experts_per_token"), ".2f")
               + ")")
      lines.append(f"| {r['label']} | {losses(r, 'teacher_forced')} | {losses(r, 'causal')} | {losses(r, 'gap')} | "
                   f"{pm(r.get('aux_bce'), '.4f')} | {pm(r.get('aux_accuracy'), '.3f')} | "
                   f"{pm(r.get('aux_mod_fraction'), '.3f')} | {pm(r.get('aux_experts_per_token'), '.2f')} | "
                   f"{other} |")
  return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str) -> str:
  """Eval loss against training FLOPs, one panel per part, one line per variant (mean over seeds)."""
  variants = dict.fromkeys(r["variant"] for r in records)
  panels = {part: {LABELS[v]: ([r for r in records if r["variant"] == v], part) for v in variants} for part in PARTS}
  return reproduce.plot_curves(panels, path, "eval loss (nats / token)", target=LABELS["dense"])


class Study(reproduce.Study):
  prog = "moma.reproduce"
  out = "runs/moma_reproduce"

  @classmethod
  def add_flags(cls, p) -> None:
    p.add_argument("--steps", type=int, default=0, help=f"training steps per run (default {DEFAULT_STEPS}; "
                   f"--quick: {QUICK_STEPS})")
    p.add_argument("--variants", default=",".join(VARIANTS), help="a subset of " + ",".join(VARIANTS))
    p.add_argument("--aux_steps", type=int, default=0, help="aux-router training steps (default: "
                   "train_aux_routers')")
    p.add_argument("--aux_eval_batches", type=int, default=0, help="validation batches of the causal evaluation "
                   "(default: the run's eval.batches)")
    p.add_argument("--train_docs", type=int, default=0, help="generated training documents (default: the "
                   "config's, 16000; --quick: 200)")
    p.add_argument("--image_tokenizer", default="", help="workdir of a trained VQ tokenizer (default: the cached "
                   "tiny one, trained on first use)")

  def __init__(self, args):
    super().__init__(args)
    self.variants = [v for v in args.variants.split(",") if v]

  def check(self) -> str:
    a = self.args
    if not self.variants or set(self.variants) - set(VARIANTS):
      return f"--variants={a.variants}: expected a comma-separated subset of {','.join(VARIANTS)}"
    if min(a.steps, a.aux_steps, a.aux_eval_batches, a.train_docs) < 0:
      return "--steps, --aux_steps, --aux_eval_batches and --train_docs must be >= 0"
    return ""

  def arms(self) -> list[reproduce.Arm]:
    scale = "quick" if self.args.quick else "default"
    return [reproduce.Arm(v, LABELS[v], f"{CONFIG}:variant={v},scale={scale}", "moma.train", PAPER_SAVINGS[v],
                          dict(variant=v)) for v in self.variants]

  def config(self, arm, seed):
    """The arm's config with the study's schedule: --steps, EVALS_PER_RUN points per curve, one checkpoint."""
    cfg = super().config(arm, seed)
    a = self.args
    reproduce.schedule(cfg, a.steps or (QUICK_STEPS if a.quick else DEFAULT_STEPS), EVALS_PER_RUN, log_every=25)
    cfg.checkpoint.keep = 1
    if a.image_tokenizer:
      cfg.data.image_tokenizer = a.image_tokenizer
    if a.train_docs:
      cfg.data.n_train_docs = a.train_docs
    return cfg

  @staticmethod
  def make_task(cfg):
    """The task on its resolved config: model.vocab_size from text, markers and the image codebook."""
    return make_task(mixed_modal.resolve(cfg, image_tokenizer.codebook_size(cfg.data)))

  def scoring(self) -> dict:
    return dict(aux_steps=self.args.aux_steps, aux_eval_batches=self.args.aux_eval_batches, aux_rule=RULE)

  def score(self, arm, cfg, task, workdir) -> dict:
    """Each part's eval curve, and for AUX_VARIANTS the aux routers' causal evaluation."""
    flops_per_step = task.train_flops_per_example * int(cfg.train.batch_size)
    keys = eval_keys(runs.read_metrics(workdir))
    curves = {part: runs.eval_curve(workdir, key, flops_per_step)._asdict() for part, key in keys.items()}
    record = dict(steps=int(cfg.train.steps), flops_per_step=flops_per_step,
                  flops_per_token=task.train_flops_per_example / task.units_per_example,
                  params=reproduce.count_params(task), final={part: c["values"][-1] for part, c in curves.items()},
                  curves=curves, train_seconds=curves["overall"]["seconds"][-1])
    if arm.extra["variant"] in AUX_VARIANTS:
      record["aux"] = aux_result(workdir, cfg, self.args)
    return record

  def report(self, records):
    rows = summarize(records)
    return markdown(rows, self.command), dict(summary=rows)

  plot = staticmethod(plot)


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
