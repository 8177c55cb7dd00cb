"""`python -m astro.reproduce [--out=runs/astro] [--seeds=3] [--quick] [--eval_problems=N] [--samples=N]`

The comparison of Kim et al. (2025, tables 1-2) in miniature, on generated arithmetic word problems
(astro/data.py) with a small byte-level dense LM. First, once per study, the base policy (the paper's one
instruct model): SFT from random weights on sampled solutions with injected errors, OUT/base_policy. Then per
seed, in order:
  base        the base policy finished with BASE_FINISH_STEPS more of the same SFT in the seed's data order
              (what each seed's pipeline starts from);
  (search)    step-level MCTS with the base policy on the first training problems, shared by the two SFT
              arms of the seed: OUT/search_s<seed> (astro/search.py; resumable);
  sft_direct  SFT from base on the direct traces (the best path of each tree): the control;
  sft_astro   SFT from base on the linearised search traces (dead ends, reflection, backtracking);
  rl_direct   GRPO from sft_direct (Direct-RL); rl_astro: GRPO from sft_astro (ASTRO-RL).
Every run is scored on held-out problems (astro/evaluate.py): pass@1 as the mean over --samples samples per
problem, maj@k over them, pass@1 by difficulty (steps per problem), backtracks per solution and their
correlation with correctness. The paper column: Llama-3.1-70B-Instruct pass@1 on MATH-500 / AMC23 / AIME24.

Runs on the shared harness (common.reproduce): OUT/results.md, OUT/results.json (read by
notebooks/astro.ipynb), OUT/pass_at_1.png; each run is an astro.train workdir OUT/runs/<arm>_s<seed>, skipped
when finished and scored, resumed when interrupted; a seed's search resumes the same way. --seeds N (default
3; --quick 1): means with 95% t-intervals. `--emit_commands` prints the trainer commands; the searches they
read are `python -m astro.search --config=astro/configs/tiny.py --config.init_run=OUT/runs/base_s<seed>
--config.train.seed=<seed> --out=OUT/search_s<seed>`.

Cost: see astro/README.md for the measured wall time of the default study.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from matplotlib.figure import Figure

from common import reproduce
from common.config import load
from common.scaling.runs import finished, format_pm, read_metrics
from common.train.loop import train
from common.train.restore import load_run_model

from astro import data as astro_data
from astro import evaluate, linearize, search
from astro import model as astro_model
from astro import train as astro_train

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "tiny.py")
# Pass@1 of Llama-3.1-70B-Instruct on MATH-500 / AMC23 / AIME24 (Kim et al. 2025, tables 1-2).
PAPER = {"base": "65.8 / 37.5 / 10.0", "sft_astro": "69.6 / 51.9 / 16.3", "rl_direct": "79.8 / 60.5 / 27.1",
         "rl_astro": "81.8 / 64.4 / 30.0"}
# name: (stage, label, the arm it starts from)
ARMS = {"base": ("base", "base policy", ""),
        "sft_direct": ("sft_direct", "Direct-SFT (best path only)", "base"),
        "sft_astro": ("sft_astro", "ASTRO-SFT (search traces)", "base"),
        "rl_direct": ("rl", "Direct-RL (GRPO from Direct-SFT)", "sft_direct"),
        "rl_astro": ("rl", "ASTRO-RL (GRPO from ASTRO-SFT)", "sft_astro")}
BASE_FINISH_STEPS = 30
# --quick: a smoke run of every stage on one- and two-step problems (the base policy: 60 steps).
QUICK = {"train.steps": {"base": 60, "sft_direct": 6, "sft_astro": 6, "rl": 3},
         "data.num_train_problems": 128, "data.min_steps": 1, "data.max_steps": 2, "search.num_problems": 32,
         "search.batch_problems": 32, "search.iterations": 4, "rl.prompts_per_step": 2, "rl.max_new_tokens": 64}


def arm_of(name: str) -> reproduce.Arm:
  stage, label, parent = ARMS[name]
  return reproduce.Arm(name, label, f"{CONFIG}:stage={stage}", "astro.train", PAPER.get(name, ""),
                       dict(stage=stage, parent=parent))


def summary_rows(records: list[dict], k: int) -> list[dict]:
  """Seed means with 95% intervals per arm, in arm order."""
  rows = []
  for name in dict.fromkeys(r["name"] for r in records):
    group = [r for r in records if r["name"] == name]
    row = dict(name=name, label=group[0]["label"], paper=group[0]["paper"], n=len(group))
    for key in ("pass@1", f"maj@{k}", f"pass@{k}", "backtracks", "backtrack_share", "backtrack_correlation",
                "length", "flops"):
      row[key], row[f"{key}_ci95"], _ = reproduce.interval([r.get(key, math.nan) for r in group])
    levels = sorted({lv for r in group for lv in r["by_difficulty"]}, key=int)
    row["by_difficulty"] = {lv: reproduce.interval([r["by_difficulty"][lv] for r in group])[:2] for lv in levels}
    rows.append(row)
  return rows


def search_rows(records: list[dict]) -> list[dict]:
  """Per seed: the search's trees, how many reached a verified answer, the traces' backtracks."""
  seen = {}
  for r in records:
    if "search" in r:
      seen[r["seed"]] = r["search"]
  return [dict(seed=s, **v) for s, v in sorted(seen.items())]


def plot(rows: list[dict], records: list[dict], path: str, k: int) -> str:
  """Left: pass@1 and maj@k per arm (seed means, 95% intervals). Right: backtracks per solution against
  pass@1, one point per run (the paper's figure 4 relation)."""
  fig = Figure(figsize=(12, 4.2))
  ax = fig.add_subplot(1, 2, 1)
  y = np.arange(len(rows))
  ci = lambda r, key: 0 if math.isnan(r[f"{key}_ci95"]) else r[f"{key}_ci95"]
  ax.barh(y - 0.2, [r["pass@1"] for r in rows], 0.4, xerr=[ci(r, "pass@1") for r in rows], label="pass@1")
  ax.barh(y + 0.2, [r[f"maj@{k}"] for r in rows], 0.4, xerr=[ci(r, f"maj@{k}") for r in rows], label=f"maj@{k}")
  ax.set(yticks=y, yticklabels=[r["label"] for r in rows], xlabel="held-out accuracy (%)")
  ax.invert_yaxis()
  ax.legend(fontsize=8)
  ax2 = fig.add_subplot(1, 2, 2)
  for i, name in enumerate(dict.fromkeys(r["name"] for r in records)):
    group = [r for r in records if r["name"] == name]
    ax2.scatter([r["backtracks"] for r in group], [r["pass@1"] for r in group], color=f"C{i}", label=name)
  ax2.set(xlabel="backtracks per solution", ylabel="pass@1 (%)", title="backtracking vs accuracy")
  ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


class Study(reproduce.Study):
  prog = "astro.reproduce"
  out = "runs/astro"
  plot_name = "pass_at_1.png"
  arm_groups = dict(all=tuple(ARMS))
  arm_of = staticmethod(arm_of)

  @classmethod
  def add_flags(cls, p) -> None:
    cls.add_arms_flag(p, "; an arm needs the arm it starts from")
    p.add_argument("--eval_problems", type=int, default=64, help="held-out problems scored per run")
    p.add_argument("--samples", type=int, default=4, help="samples per problem (pass@1 is their mean; maj@k "
                   "votes over all of them)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature of the evaluation")

  def check(self) -> str:
    if self.unknown_arm():
      return self.unknown_arm()
    names = self.arm_names()
    orphan = [n for n in names if ARMS[n][2] and ARMS[n][2] not in names]
    if orphan:
      return f"--arms: '{orphan[0]}' starts from '{ARMS[orphan[0]][2]}', which is not among the arms"
    if self.args.eval_problems < 1 or self.args.samples < 1:
      return "--eval_problems and --samples must be >= 1"
    return ""

  @property
  def base_policy(self) -> str:
    return os.path.abspath(os.path.join(self.args.out, "base_policy"))

  def base_policy_config(self):
    cfg = load(f"{CONFIG}:stage=base", [tuple(item.split("=", 1)) for item in self.args.set])
    cfg.log.progress = "lines"
    cfg.checkpoint.every_steps = min(int(cfg.checkpoint.every_steps), 100)  # a killed study loses little
    if self.args.quick:
      self._quick(cfg)
    return cfg

  def prepare(self) -> None:
    """The base policy every seed starts from, trained once per OUT (resumed when interrupted). Compilations
    are cached in OUT/jax_cache: the study's runs share a handful of shapes (its SFT arms, its RL arms)."""
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(self.args.out, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if finished(self.base_policy):
      return
    cfg = self.base_policy_config()
    if self.args.emit_commands:
      print(reproduce.trainer_command(arm_of("base"), cfg, self.base_policy), flush=True)
      return
    astro_train.resolve(cfg)
    astro_train.validate(cfg)
    self.log(f"base policy: {cfg.train.steps} steps -> {self.base_policy}")
    if train(cfg, self.base_policy, astro_train.make_task(cfg)) != 0:
      raise SystemExit(f"[{self.prog}] the base policy stopped early; rerun to resume ({self.base_policy})")

  def _quick(self, cfg) -> None:
    for key, value in QUICK.items():
      section, name = key.split(".")
      cfg[section][name] = value[cfg.stage] if isinstance(value, dict) else value
    cfg.train.warmup_steps = 1
    cfg.eval.every_steps = cfg.checkpoint.every_steps = cfg.train.steps

  def search_dir(self, seed: int) -> str:
    return os.path.abspath(os.path.join(self.args.out, f"search_s{seed}"))

  def config(self, arm, seed):
    """The arm's stage config: --quick sizes, the run it starts from (the same seed's parent arm) and the
    seed's search; resolved in make_task, once the parent has trained."""
    cfg = super().config(arm, seed)
    if self.args.quick:
      self._quick(cfg)
    if arm.name == "base":  # a short finish of the shared base policy, at a lower rate
      cfg.train.update(steps=5 if self.args.quick else BASE_FINISH_STEPS, warmup_steps=1,
                       learning_rate=cfg.train.learning_rate / 3)
      cfg.eval.every_steps = cfg.checkpoint.every_steps = cfg.train.steps
    parent = arm.extra["parent"]
    cfg.init_run = self.base_policy if not parent else \
        os.path.abspath(reproduce.workdir_of(self.args.out, arm_of(parent), seed))
    if cfg.stage in astro_train.TRACES:
      cfg.data.search_dir = self.search_dir(seed)
    return cfg

  def make_task(self, cfg):
    """The seed's search first (an SFT stage; resumed or read back when done), then the stage's task."""
    if cfg.stage in astro_train.TRACES:
      search.search_for(cfg.copy_and_resolve_references(), cfg.data.search_dir, log=self.log)
    astro_train.resolve(cfg)
    astro_train.validate(cfg)
    return astro_train.make_task(cfg)

  @property
  def eval_problems(self) -> int:
    return min(self.args.eval_problems, 16) if self.args.quick else self.args.eval_problems

  def scoring(self) -> dict:
    return dict(eval_problems=self.eval_problems, samples=self.args.samples, temperature=self.args.temperature)

  def score(self, arm, cfg, task, workdir) -> dict:
    model = load_run_model(workdir, cfg, task.build_model, key="--out")[0]
    tokenizer = astro_model.tokenizer_for(cfg)
    _, test = astro_data.problem_sets(cfg.data)
    result = evaluate.evaluate_policy(
        model, tokenizer, test[:self.eval_problems], n=self.args.samples, k=self.args.samples,
        temperature=self.args.temperature, max_new_tokens=int(cfg.rl.max_new_tokens), seed=int(cfg.train.seed),
        backtrack=linearize.backtrack_pattern(cfg.linearize))
    flops_per_step = task.train_flops_per_example * int(cfg.train.batch_size)
    metrics = read_metrics(workdir)
    key = "reward" if cfg.stage == "rl" else "eval/loss"
    points = [m for m in metrics if key in m]
    result["curves"] = {key: dict(steps=[m["step"] for m in points], flops=[m["step"] * flops_per_step for m in points],
                                  values=[m[key] for m in points])}
    result.update(steps=int(cfg.train.steps), flops=flops_per_step * int(cfg.train.steps))
    if cfg.stage in astro_train.TRACES:
      trees = search.read_trees(cfg.data.search_dir)
      traces = linearize.sft_examples(trees, cfg.linearize, "astro")
      pattern = linearize.backtrack_pattern(cfg.linearize)
      result["search"] = dict(trees=len(trees), solved=len(traces),
                              nodes=float(np.mean([len(t.nodes) for t in trees])),
                              trace_backtracks=float(np.mean([linearize.count_backtracks(t["response"], pattern)
                                                              for t in traces])) if traces else math.nan)
    self.log(f"{arm.label} seed {cfg.train.seed}: pass@1 {result['pass@1']:.1f}, backtracks "
             f"{result['backtracks']:.2f}")
    return result

  def report(self, records):
    k = self.args.samples
    rows = summary_rows(records, k)
    levels = sorted({lv for r in rows for lv in r["by_difficulty"]}, key=int)
    pm = lambda r, key, fmt=".1f": format_pm(r[key], r[f"{key}_ci95"], fmt)
    lines = [f"Held-out generated problems ({self.eval_problems}), {k} samples each at temperature "
             f"{self.args.temperature:g}; mean over seeds with 95% t-intervals.", ""]
    lines += reproduce.table(
        ["arm", "pass@1", f"maj@{k}", f"pass@{k}", *(f"pass@1, {lv} steps" for lv in levels),
         "backtracks / solution", "corr(backtracks, correct)", "seeds"],
        [([r["label"], pm(r, "pass@1"), pm(r, f"maj@{k}"), pm(r, f"pass@{k}"),
           *(format_pm(*r["by_difficulty"].get(lv, (math.nan, math.nan)), ".1f") for lv in levels),
           pm(r, "backtracks", ".2f"), pm(r, "backtrack_correlation", ".2f"), r["n"]], r["paper"]) for r in rows],
        paper="paper pass@1 MATH-500 / AMC23 / AIME24 (Llama-3.1-70B)")
    searches = search_rows(records)
    if searches:
      lines += ["", "Searches (one per seed, shared by its SFT arms):", "",
                "| seed | trees | with a verified answer | nodes per tree | backtracks per ASTRO trace |",
                "|---|---|---|---|---|"]
      lines += [f"| {s['seed']} | {s['trees']} | {s['solved']} | {s['nodes']:.1f} | {s['trace_backtracks']:.2f} |"
                for s in searches]
    return "\n".join(lines) + "\n", dict(summary=rows, searches=searches)

  def plot(self, records, path):
    return plot(summary_rows(records, self.args.samples), records, path, self.args.samples)


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
