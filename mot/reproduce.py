"""`python -m mot.reproduce [--out=runs/mot_reproduce] [--steps=N] [--seeds=N]
[--settings=chameleon,chameleon_audio,transfusion] [--eval_scenes=N] [--config=PATH] [--set=KEY=VALUE ...]
[--image_tokenizer=DIR]`

The comparison of Liang et al. 2024 (arXiv 2411.04996, figs. 3-5 and 9) in miniature: in each setting a dense
transformer and a Mixture-of-Transformers of the same shapes (so the same FLOPs per token, common.flops) are
trained on the same generated mixed-modal documents for the same steps:
  chameleon        text + image, every modality as discrete tokens (VQ image tokens), next-token loss;
  chameleon_audio  the same plus speech tokens (the paper's speech setting);
  transfusion      text tokens + diffusion over image patches (the paper's Transfusion setting).
Per modality we report the fraction of the dense model's training FLOPs at which MoT first reaches the dense
model's final eval loss (common.scaling.matching; the paper: 55.8% overall for Chameleon 7B, 37.2% for speech,
about one third for Transfusion images), the same fraction of training wall-clock, and the two generation
scores of mot.evaluate: images generated from held-out captions read back by the attribute classifier, and
greedy captions of held-out images parsed back into attributes (per attribute, over `--eval_scenes` scenes).

Writes table.md, results.json and loss_vs_flops.png (eval loss of each modality against training FLOPs, dense
vs MoT, every seed) into --out. Each run lives in --out/runs/<setting>_<model>_s<seed> (a workdir of the shared
trainer: an interrupted run resumes, a scored one is read from its reproduce.json). With --seeds N every run is
repeated with train.seed 0..N-1 (initialisation and batch order; the generated documents stay the same) and
every figure is the mean with a 95% t-interval (common.scaling.intervals).

Time: see mot/README.md for the measured cost of a reduced run and the extrapolation to the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "reproduce.py")
SETTINGS = {"chameleon": ("chameleon", "text+image"), "chameleon_audio": ("chameleon", "text+image+audio"),
            "transfusion": ("transfusion", "text+image")}
MODELS = ("dense", "mot")
EVAL_SCENE_SEED = 777_000  # the held-out scenes both generation scores use
PAPER = {"chameleon": "55.8% (7B, overall)", "chameleon_audio": "37.2% (speech)",
         "transfusion": "~33% (image, 7B)"}


def _log(msg: str) -> None:
  print(f"[mot.reproduce] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class Run:
  setting: str  # a key of SETTINGS
  model: str    # 'dense' | 'mot'
  seed: int

  @property
  def name(self) -> str:
    return f"{self.setting}_{self.model}_s{self.seed}"


def run_config(run: Run, a):
  """The trainer config of `run`: --config at the run's setting and model, with the study's schedule."""
  from common.config import load, override
  setting, modalities = SETTINGS[run.setting]
  cfg = load(f"{a.config}:setting={setting},modalities={modalities},model={run.model}")
  steps = int(a.steps) if a.steps else int(cfg.train.steps)
  every = max(1, math.ceil(steps / a.evals))
  cfg.train.update(steps=steps, seed=run.seed, warmup_steps=min(int(cfg.train.warmup_steps), max(1, steps // 10)))
  cfg.eval.update(every_steps=every, sample_images=0)
  cfg.checkpoint.update(every_steps=every, keep=1)
  cfg.log.update(progress="lines", every_steps=max(1, min(10, every)))
  if a.cache_dir:
    cfg.data.cache_dir = a.cache_dir
  if a.image_tokenizer:
    cfg.data.image_tokenizer = a.image_tokenizer
  for item in a.set:
    key, _, value = item.partition("=")
    override(cfg, key, value)
  return cfg


def curves(workdir: str, modalities: tuple[str, ...], flops_per_step: float) -> dict[str, dict]:
  """{modality: {'flops', 'seconds', 'values'}} of eval/loss_<modality>, and 'overall' (eval/loss, the
  training objective over all targets) from metrics.jsonl."""
  from common.scaling.runs import eval_curve
  keys = {m: f"eval/loss_{m}" for m in modalities}
  keys["overall"] = "eval/loss"
  return {name: eval_curve(workdir, key, flops_per_step)._asdict() for name, key in keys.items()}


def score(model, task, cfg, a, classifier) -> dict:
  """Generation scores of a trained model on the held-out scenes (mot.evaluate), per attribute."""
  from common.data.mixed_modal import scenes
  from mot import evaluate
  size = int(cfg.data.image_size)
  held_out = scenes.sample_scenes(a.eval_scenes, EVAL_SCENE_SEED, size)
  data = task.data
  images = evaluate.generate_images(
      model, data.vocab, [scenes.caption(s) for s in held_out], image_tokenizer=data.image_tokenizer,
      image_size=size, patch_size=int(cfg.data.patch_size), temperature=a.temperature, top_k=a.top_k,
      sample_steps=int(cfg.model.diffusion.sample_steps))
  captions = evaluate.generate_captions(model, data.vocab, scenes.render_batch(held_out, size),
                                        image_tokenizer=data.image_tokenizer, patch_size=int(cfg.data.patch_size))
  return dict(image_accuracy=evaluate.image_accuracy(images, held_out, classifier),
              caption_accuracy=evaluate.caption_accuracy(captions, held_out),
              caption_examples=[[scenes.caption(s), c] for s, c in list(zip(held_out, captions))[:3]])


def run_one(run: Run, a, classifier) -> dict:
  """Trains (or resumes) and scores one run; its record (read back when it was scored before with the same
  scoring flags)."""
  from common.scaling.runs import finished
  from common.train.loop import train
  from common.train.restore import load_run_model
  from mot.train import make_task
  workdir = os.path.join(a.out, "runs", run.name)
  record_path = os.path.join(workdir, "reproduce.json")
  scoring = dict(eval_scenes=a.eval_scenes, temperature=a.temperature, top_k=a.top_k)
  if os.path.exists(record_path) and finished(workdir):
    with open(record_path) as f:
      record = json.load(f)
    if record.get("scoring") == scoring:
      return record
  cfg = run_config(run, a)
  task = make_task(cfg)
  flops_per_step = task.train_flops_per_example * int(cfg.train.batch_size)
  start = time.time()
  if not finished(workdir):
    _log(f"{run.name}: {cfg.train.steps} steps x {flops_per_step:.3g} FLOPs -> {workdir}")
    status = train(cfg, workdir, task)
    if status != 0:
      raise SystemExit(f"[mot.reproduce] {run.name} stopped with status {status}; rerun to resume ({workdir})")
  model, _ = load_run_model(workdir, cfg, task.build_model, key="--out")
  record = dict(setting=run.setting, model=run.model, seed=run.seed, steps=int(cfg.train.steps),
                flops_per_step=flops_per_step, train_flops=flops_per_step * int(cfg.train.steps),
                curves=curves(workdir, tuple(cfg.data.modalities), flops_per_step),
                scoring=scoring, **score(model, task, cfg, a, classifier))
  record["wall_s"] = time.time() - start
  with open(record_path, "w") as f:
    json.dump(record, f, indent=1)
  _log(f"{run.name}: final eval " + ", ".join(f"{k} {v['values'][-1]:.4f}" for k, v in record["curves"].items()
                                             if v["values"]))
  return record


# --------------------------------------------------------------------------------------------- report


def matched_fractions(dense: dict, mot: dict, key: str) -> tuple[float, float]:
  """(fraction of the dense run's training FLOPs, and of its training seconds) at which the MoT run's curve
  `key` first reaches the dense run's final value (NaN where it never does)."""
  from common.scaling.matching import fraction_to_reach
  d, m = dense["curves"][key], mot["curves"][key]
  flops = fraction_to_reach(d["flops"], d["values"], m["flops"], m["values"])
  seconds = fraction_to_reach(d["seconds"], d["values"], m["seconds"], m["values"])
  return flops, seconds


def _mean(values: list[float]) -> tuple[float, float, int]:
  """(mean, 95% half-width, count) over the finite values."""
  from common.scaling.intervals import t_interval
  finite = [v for v in values if not math.isnan(v)]
  if not finite:
    return math.nan, math.nan, 0
  mean, half = t_interval(finite)
  return mean, half, len(finite)


def summarize(records: list[dict]) -> list[dict]:
  """One row per (setting, curve): dense and MoT final losses and the matched fractions, over seeds."""
  rows = []
  for setting in dict.fromkeys(r["setting"] for r in records):
    by = {(r["model"], r["seed"]): r for r in records if r["setting"] == setting}
    seeds = sorted({s for (_, s) in by if ("dense", s) in by and ("mot", s) in by})
    if not seeds:
      continue
    for key in by[("dense", seeds[0])]["curves"]:
      pairs = [(by[("dense", s)], by[("mot", s)]) for s in seeds]
      if not all(d["curves"][key]["values"] and m["curves"][key]["values"] for d, m in pairs):
        continue
      fractions = [matched_fractions(d, m, key) for d, m in pairs]
      row = dict(setting=setting, curve=key, seeds=len(seeds))
      row["dense_loss"], row["dense_loss_ci95"], _ = _mean([d["curves"][key]["values"][-1] for d, _ in pairs])
      row["mot_loss"], row["mot_loss_ci95"], _ = _mean([m["curves"][key]["values"][-1] for _, m in pairs])
      row["flops_fraction"], row["flops_fraction_ci95"], row["reached"] = _mean([f for f, _ in fractions])
      row["time_fraction"], row["time_fraction_ci95"], _ = _mean([t for _, t in fractions])
      rows.append(row)
  return rows


def generation_rows(records: list[dict]) -> list[dict]:
  """One row per (setting, model): each attribute's image and caption accuracy over seeds."""
  from mot.evaluate import ATTRIBUTES
  rows = []
  for setting in dict.fromkeys(r["setting"] for r in records):
    for model in MODELS:
      group = [r for r in records if r["setting"] == setting and r["model"] == model]
      if not group:
        continue
      row = dict(setting=setting, model=model, seeds=len(group))
      for kind in ("image_accuracy", "caption_accuracy"):
        for attr in ATTRIBUTES:
          row[f"{kind}/{attr}"], row[f"{kind}/{attr}_ci95"], _ = _mean([r[kind][attr] for r in group])
      rows.append(row)
  return rows


def _pct(value: float, half: float) -> str:
  from common.scaling.runs import format_pm
  return "not reached" if math.isnan(value) else format_pm(100 * value, 100 * half, ".1f") + "%"


def markdown(summary: list[dict], generation: list[dict], classifier_accuracy: dict, header: str) -> str:
  from common.scaling.runs import format_pm
  from mot.evaluate import ATTRIBUTES
  lines = [header, "", "| setting | modality | dense final loss | MoT final loss | MoT FLOPs to the dense final loss "
           "(% of dense) | MoT wall-clock to it (% of dense) | seeds reaching it | paper |",
           "|---|---|---|---|---|---|---|---|"]
  for r in summary:
    paper = PAPER[r["setting"]] if r["curve"] == ("image" if r["setting"] == "transfusion" else
                                                   "audio" if r["setting"] == "chameleon_audio" else "overall") else ""
    lines.append(f"| {r['setting']} | {r['curve']} | {format_pm(r['dense_loss'], r['dense_loss_ci95'], '.4f')} | "
                 f"{format_pm(r['mot_loss'], r['mot_loss_ci95'], '.4f')} | "
                 f"{_pct(r['flops_fraction'], r['flops_fraction_ci95'])} | "
                 f"{_pct(r['time_fraction'], r['time_fraction_ci95'])} | {r['reached']}/{r['seeds']} | {paper} |")
  attrs = " / ".join(ATTRIBUTES)
  lines += ["", "Loss: nats per target token of the modality (Transfusion image: noise-prediction MSE per patch); "
            "overall: the training objective over all targets.", "",
            f"| setting | model | image from caption: {attrs} | caption from image: {attrs} | seeds |",
            "|---|---|---|---|---|"]
  for r in generation:
    image = " / ".join(format(r[f"image_accuracy/{a}"], ".2f") for a in ATTRIBUTES)
    caption = " / ".join(format(r[f"caption_accuracy/{a}"], ".2f") for a in ATTRIBUTES)
    lines.append(f"| {r['setting']} | {r['model']} | {image} | {caption} | {r['seeds']} |")
  lines += ["", "Generation accuracy: share of held-out scenes whose first shape is right on each attribute "
            "(images read by the attribute classifier, held-out accuracy "
            + ", ".join(f"{a} {v:.3f}" for a, v in classifier_accuracy.items()) + "; captions parsed)."]
  return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str) -> str:
  """Eval loss of each modality against training FLOPs: one row of panels per setting, dense vs MoT, every
  seed; the dense final loss dotted."""
  from matplotlib.figure import Figure
  settings = list(dict.fromkeys(r["setting"] for r in records))
  keys = {s: [k for k in next(r for r in records if r["setting"] == s)["curves"] if k != "overall"] for s in settings}
  cols = max(len(k) for k in keys.values())
  fig = Figure(figsize=(4.2 * cols, 3.2 * len(settings)))
  colors = {"dense": "tab:blue", "mot": "tab:orange"}
  for i, setting in enumerate(settings):
    for j, key in enumerate(keys[setting]):
      ax = fig.add_subplot(len(settings), cols, i * cols + j + 1)
      for model in MODELS:
        for k, r in enumerate(r for r in records if r["setting"] == setting and r["model"] == model):
          c = r["curves"][key]
          ax.plot(c["flops"], c["values"], "o-", ms=3, color=colors[model], alpha=0.8,
                  label=model if k == 0 else None)
          if model == "dense" and c["values"]:
            ax.axhline(c["values"][-1], color=colors[model], ls=":", lw=1)
      ax.set(xscale="log", xlabel="training FLOPs", ylabel=f"eval loss ({key})", title=f"{setting}: {key}")
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/mot_reproduce")
  p.add_argument("--config", default=DEFAULT_CONFIG, help="the config file of every run (tiny.py for a smoke run)")
  p.add_argument("--settings", default=",".join(SETTINGS))
  p.add_argument("--steps", type=int, default=0, help="training steps of every run (0: the config's)")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--evals", type=int, default=10, help="evals per run (points of each curve)")
  p.add_argument("--eval_scenes", type=int, default=64, help="held-out scenes of each generation score")
  p.add_argument("--temperature", type=float, default=1.0, help="Chameleon image-token sampling")
  p.add_argument("--top_k", type=int, default=32, help="Chameleon image-token sampling")
  p.add_argument("--classifier_steps", type=int, default=0, help="attribute classifier steps (0: the default)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override applied to every run (repeatable), e.g. --set=model.d_model=128")
  p.add_argument("--image_tokenizer", default="", help="workdir of a mot.train_image_tokenizer run (default: "
                 "the cached tiny tokenizer)")
  p.add_argument("--cache_dir", default="", help="data, tokenizer and classifier caches (default: data.cache_dir)")
  a = p.parse_args(argv)
  settings = [s for s in a.settings.split(",") if s]
  unknown = [s for s in settings if s not in SETTINGS]
  if unknown or not settings:
    p.error(f"--settings: unknown {unknown} (known: {', '.join(SETTINGS)})")
  if a.seeds < 1 or a.steps < 0 or a.evals < 1 or a.eval_scenes < 1:
    p.error("--seeds, --evals and --eval_scenes must be positive, --steps >= 0")
  if not os.path.isfile(a.config):
    p.error(f"--config: no such file '{a.config}'")
  os.makedirs(a.out, exist_ok=True)
  from mot.evaluate import cached_classifier
  probe = run_config(Run(settings[0], "dense", 0), a)
  overrides = {"steps": a.classifier_steps} if a.classifier_steps else {}
  classifier, classifier_accuracy = cached_classifier(a.cache_dir or probe.data.cache_dir,
                                                      int(probe.data.image_size), **overrides)
  _log("attribute classifier held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in classifier_accuracy.items()))
  start = time.time()
  records = [run_one(Run(s, m, seed), a, classifier) for seed in range(a.seeds) for s in settings for m in MODELS]
  summary, generation = summarize(records), generation_rows(records)
  header = (f"MoT vs dense at equal FLOPs per token: {records[0]['steps']} steps per run, "
            f"{a.seeds} seed(s) (± = 95% t-interval over seeds), config {os.path.relpath(a.config, os.getcwd())}.")
  table = markdown(summary, generation, classifier_accuracy, header)
  with open(os.path.join(a.out, "table.md"), "w") as f:
    f.write(table)
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(dict(args=vars(a), classifier_accuracy=classifier_accuracy, summary=summary, generation=generation,
                   runs=records), f, indent=1)
  plot(records, os.path.join(a.out, "loss_vs_flops.png"))
  print(table)
  _log(f"done in {time.time() - start:.0f}s -> {a.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
