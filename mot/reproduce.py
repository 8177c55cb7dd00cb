"""`python -m mot.reproduce [--out=runs/mot_reproduce] [--steps=N] [--seeds=N]
[--settings=chameleon,chameleon_audio,transfusion] [--eval_scenes=N] [--config=PATH] [--set=KEY=VALUE ...]
[--image_tokenizer=DIR] [--guidance_scale=W] [--quick]`

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

Runs on the shared harness (common.reproduce): results.md, results.json (read by notebooks/mot.ipynb) and
loss_vs_flops.png (eval loss of each modality against training FLOPs, dense vs MoT, mean over seeds) in --out;
each run is a trainer workdir --out/runs/<setting>_<model>_s<seed> (interrupted: resumed; scored: read back).
--seeds N (default 3) repeats every run with train.seed 0..N-1 (initialisation and batch order; the generated
documents stay the same), every figure the mean with a 95% t-interval. --quick: mot/configs/tiny.py, a few
steps, a few scenes, one seed.

Time: see mot/README.md for the measured cost of a reduced run and the extrapolation to the defaults.
"""
from __future__ import annotations

import math
import os

from common import reproduce
from common.data.mixed_modal import scenes
from common.scaling.matching import fraction_to_reach
from common.scaling.runs import eval_curve, format_pm
from common.train.restore import load_run_model
from mot import evaluate
from mot import train as mot_train

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "reproduce.py")
QUICK_CONFIG = os.path.join(HERE, "configs", "tiny.py")
SETTINGS = {"chameleon": ("chameleon", "text+image"), "chameleon_audio": ("chameleon", "text+image+audio"),
            "transfusion": ("transfusion", "text+image")}
MODELS = ("dense", "mot")
EVAL_SCENE_SEED = 777_000  # the held-out scenes both generation scores use
# The paper's MoT FLOPs to the dense final loss, and the curve of each setting it is reported on.
PAPER = {"chameleon": "55.8% (7B, overall)", "chameleon_audio": "37.2% (speech)",
         "transfusion": "~33% (image, 7B)"}
HEADLINE = {"chameleon": "overall", "chameleon_audio": "audio", "transfusion": "image"}
QUICK = dict(steps=4, evals=2, eval_scenes=2, classifier_steps=20)


def score(model, task, cfg, a, classifier) -> dict:
  """Generation scores of a trained model on the held-out scenes (mot.evaluate), per attribute."""
  size = int(cfg.data.image_size)
  held_out = scenes.sample_scenes(a.eval_scenes, EVAL_SCENE_SEED, size)
  data = task.data
  images = evaluate.generate_images(
      model, data.vocab, [scenes.caption(s) for s in held_out], image_tokenizer=data.image_tokenizer,
      image_size=size, patch_size=int(cfg.data.patch_size), temperature=a.temperature, top_k=a.top_k,
      sample_steps=int(cfg.model.diffusion.sample_steps), guidance_scale=a.guidance_scale)
  captions = evaluate.generate_captions(model, data.vocab, scenes.render_batch(held_out, size),
                                        image_tokenizer=data.image_tokenizer, patch_size=int(cfg.data.patch_size))
  return dict(image_accuracy=evaluate.image_accuracy(images, held_out, classifier),
              caption_accuracy=evaluate.caption_accuracy(captions, held_out),
              caption_examples=[[scenes.caption(s), c] for s, c in list(zip(held_out, captions))[:3]])


def matched_fractions(dense: dict, mot: dict, key: str) -> tuple[float, float]:
  """(fraction of the dense run's training FLOPs, and of its training seconds) at which the MoT run's curve
  `key` first reaches the dense run's final value (NaN where it never does)."""
  d, m = dense["curves"][key], mot["curves"][key]
  flops = fraction_to_reach(d["flops"], d["values"], m["flops"], m["values"])
  seconds = fraction_to_reach(d["seconds"], d["values"], m["seconds"], m["values"])
  return flops, seconds


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
      row = dict(setting=setting, curve=key, seeds=len(seeds), paper=PAPER[setting] if key == HEADLINE[setting]
                 else "")
      row["dense_loss"], row["dense_loss_ci95"], _ = reproduce.interval([d["curves"][key]["values"][-1]
                                                                         for d, _ in pairs])
      row["mot_loss"], row["mot_loss_ci95"], _ = reproduce.interval([m["curves"][key]["values"][-1] for _, m in pairs])
      row["flops_fraction"], row["flops_fraction_ci95"], row["reached"] = reproduce.interval([f for f, _ in fractions])
      row["time_fraction"], row["time_fraction_ci95"], _ = reproduce.interval([t for _, t in fractions])
      rows.append(row)
  return rows


def generation_rows(records: list[dict]) -> list[dict]:
  """One row per (setting, model): each attribute's image and caption accuracy over seeds."""
  rows = []
  for setting in dict.fromkeys(r["setting"] for r in records):
    for model in MODELS:
      group = [r for r in records if r["setting"] == setting and r["model"] == model]
      if not group:
        continue
      row = dict(setting=setting, model=model, seeds=len(group))
      for kind in ("image_accuracy", "caption_accuracy"):
        for attr in evaluate.ATTRIBUTES:
          row[f"{kind}/{attr}"], row[f"{kind}/{attr}_ci95"], _ = reproduce.interval([r[kind][attr] for r in group])
      rows.append(row)
  return rows


def _pct(value: float, half: float) -> str:
  return "not reached" if math.isnan(value) else format_pm(100 * value, 100 * half, ".1f") + "%"


def markdown(summary: list[dict], generation: list[dict], classifier_accuracy: dict, header: str) -> str:
  lines = [header, ""] + reproduce.table(
      ["setting", "modality", "dense final loss", "MoT final loss", "MoT FLOPs to the dense final loss (% of dense)",
       "MoT wall-clock to it (% of dense)", "seeds reaching it"],
      [([r["setting"], r["curve"], format_pm(r["dense_loss"], r["dense_loss_ci95"], ".4f"),
         format_pm(r["mot_loss"], r["mot_loss_ci95"], ".4f"), _pct(r["flops_fraction"], r["flops_fraction_ci95"]),
         _pct(r["time_fraction"], r["time_fraction_ci95"]), f"{r['reached']}/{r['seeds']}"], r["paper"])
       for r in summary])
  attrs = " / ".join(evaluate.ATTRIBUTES)
  lines += ["", "Loss: nats per target token of the modality (Transfusion image: noise-prediction MSE per patch); "
            "overall: the training objective over all targets (Transfusion: text mean + lambda x image mean).", "",
            f"| setting | model | image from caption: {attrs} | caption from image: {attrs} | seeds |",
            "|---|---|---|---|---|"]
  for r in generation:
    image = " / ".join(format(r[f"image_accuracy/{a}"], ".2f") for a in evaluate.ATTRIBUTES)
    caption = " / ".join(format(r[f"caption_accuracy/{a}"], ".2f") for a in evaluate.ATTRIBUTES)
    lines.append(f"| {r['setting']} | {r['model']} | {image} | {caption} | {r['seeds']} |")
  lines += ["", "Generation accuracy: share of held-out scenes whose first shape is right on each attribute "
            "(images read by the attribute classifier, held-out accuracy "
            + ", ".join(f"{a} {v:.3f}" for a, v in classifier_accuracy.items()) + "; captions parsed)."]
  return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str) -> str:
  """Eval loss of each modality against training FLOPs, one panel per (setting, modality), dense vs MoT (mean
  over seeds), the dense final loss dotted."""
  panels = {}
  for setting in dict.fromkeys(r["setting"] for r in records):
    runs = [r for r in records if r["setting"] == setting]
    for key in (k for k in runs[0]["curves"] if k != "overall"):
      panels[f"{setting}: {key}"] = {m: ([r for r in runs if r["model"] == m], key) for m in MODELS
                                     if any(r["model"] == m for r in runs)}
  return reproduce.plot_curves(panels, path, "eval loss", target="dense")


class Study(reproduce.Study):
  prog = "mot.reproduce"
  out = "runs/mot_reproduce"

  @classmethod
  def add_flags(cls, p) -> None:
    p.add_argument("--config", default="", help="the config file of every run (default mot/configs/reproduce.py; "
                   "--quick: tiny.py)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--steps", type=int, default=0, help=f"training steps of every run (0: the config's; --quick: "
                   f"{QUICK['steps']})")
    p.add_argument("--evals", type=int, default=0, help="evals per run (points of each curve; default 10)")
    p.add_argument("--eval_scenes", type=int, default=0, help="held-out scenes of each generation score "
                   "(default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="Chameleon image-token sampling")
    p.add_argument("--top_k", type=int, default=32, help="Chameleon image-token sampling")
    p.add_argument("--guidance_scale", type=float, default=1.0, help="Transfusion image sampling: classifier-free "
                   "guidance scale (1: none; needs runs trained with model.diffusion.caption_dropout > 0)")
    p.add_argument("--classifier_steps", type=int, default=0, help="attribute classifier steps (0: the default)")
    p.add_argument("--image_tokenizer", default="", help="workdir of a mot.train_image_tokenizer run (default: "
                   "the cached tiny tokenizer)")

  def __init__(self, args):
    super().__init__(args)
    quick = QUICK if args.quick else {}
    args.config = args.config or (QUICK_CONFIG if args.quick else DEFAULT_CONFIG)
    args.steps = args.steps or quick.get("steps", 0)
    args.evals = args.evals or quick.get("evals", 10)
    args.eval_scenes = args.eval_scenes or quick.get("eval_scenes", 64)
    args.classifier_steps = args.classifier_steps or quick.get("classifier_steps", 0)
    self.settings = [s for s in args.settings.split(",") if s]

  def check(self) -> str:
    unknown = [s for s in self.settings if s not in SETTINGS]
    if unknown or not self.settings:
      return f"--settings: unknown {unknown} (known: {', '.join(SETTINGS)})"
    if min(self.args.steps, self.args.evals, self.args.eval_scenes) < 0:
      return "--steps, --evals and --eval_scenes must be >= 0"
    return "" if os.path.isfile(self.args.config) else f"--config: no such file '{self.args.config}'"

  def arms(self) -> list[reproduce.Arm]:
    return [reproduce.Arm(f"{s}_{m}", f"{s} {m}", f"{self.args.config}:setting={SETTINGS[s][0]},"
                          f"modalities={SETTINGS[s][1]},model={m}", "mot.train", PAPER[s] if m == "mot" else "",
                          dict(setting=s, model=m)) for s in self.settings for m in MODELS]

  def prepare(self) -> None:
    """The attribute classifier that reads generated images back (trained once, cached)."""
    if self.args.emit_commands:
      return
    probe = self.config(self.arms()[0], 0)
    overrides = {"steps": self.args.classifier_steps} if self.args.classifier_steps else {}
    self.classifier, self.classifier_accuracy = evaluate.cached_classifier(
        self.args.cache_dir or probe.data.cache_dir, int(probe.data.image_size), **overrides)
    self.log("attribute classifier held-out accuracy: " + ", ".join(f"{k} {v:.3f}"
                                                                    for k, v in self.classifier_accuracy.items()))

  def config(self, arm, seed):
    """The arm's config with the study's schedule: --steps, --evals points per curve, one checkpoint kept."""
    cfg = super().config(arm, seed)
    a = self.args
    reproduce.schedule(cfg, int(a.steps) if a.steps else int(cfg.train.steps), a.evals)
    cfg.eval.sample_images = 0
    cfg.checkpoint.keep = 1
    if a.image_tokenizer:
      cfg.data.image_tokenizer = a.image_tokenizer
    return cfg

  @staticmethod
  def make_task(cfg):
    return mot_train.make_task(mot_train.resolve(cfg))

  def scoring(self) -> dict:
    return dict(eval_scenes=self.args.eval_scenes, temperature=self.args.temperature, top_k=self.args.top_k,
                guidance_scale=self.args.guidance_scale)

  def score(self, arm, cfg, task, workdir) -> dict:
    """Every modality's eval curve (and 'overall', the training objective) and the generation scores."""
    flops_per_step = task.train_flops_per_example * int(cfg.train.batch_size)
    model, _ = load_run_model(workdir, cfg, task.build_model, key="--out")
    keys = {m: f"eval/loss_{m}" for m in cfg.data.modalities}
    keys["overall"] = "eval/loss"
    return dict(steps=int(cfg.train.steps), flops_per_step=flops_per_step,
                train_flops=flops_per_step * int(cfg.train.steps),
                curves={k: eval_curve(workdir, key, flops_per_step)._asdict() for k, key in keys.items()},
                **score(model, task, cfg, self.args, self.classifier))

  def report(self, records):
    summary, generation = summarize(records), generation_rows(records)
    header = (f"MoT vs dense at equal FLOPs per token: {records[0]['steps']} steps per run, "
              f"{self.args.seeds} seed(s) (± = 95% t-interval over seeds), config "
              f"{os.path.relpath(self.args.config, os.getcwd())}.")
    return (markdown(summary, generation, self.classifier_accuracy, header),
            dict(classifier_accuracy=self.classifier_accuracy, summary=summary, generation=generation))

  plot = staticmethod(plot)


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
