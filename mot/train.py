"""`python -m mot.train --config=mot/configs/tiny.py[:setting=chameleon|transfusion,modalities=text+image+audio,
model=mot|dense,norm=post|pre] --workdir=DIR [--config.K=V ...]`

Trains a Mixture-of-Transformers (Liang et al. 2024, arXiv 2411.04996) or its dense baseline on mixed-modal
documents (`common.data.mixed_modal`) with the shared loop: resume, SIGTERM -> 143, exit 2 on bad input.
metrics.jsonl carries the loss of each modality (`eval/loss_text`, `eval/loss_image`, `eval/loss_audio`: mean
nats per target token of that modality; in the Transfusion setting `eval/loss_image` is the diffusion
noise-prediction MSE per image patch, sec. 3.2 of the paper, and `eval/loss` the objective text mean +
lambda x image mean), and DIR/samples.txt greedy captions of a few generated scenes at every eval.

FLOPs per token (MFU, the reproduce's x-axis): a MoT layer multiplies each token by its own modality's
weights only, so it costs a dense layer of the same shapes (sec. 2.2); the count is the dense LM's of
`common.flops`, plus, for Transfusion, the patch and timestep projections every position goes through.
"""
from __future__ import annotations

import dataclasses
import functools
import math

from flax import nnx

from common.config import ConfigError, require
from common.data.mixed_modal import scenes, validate_data_config
from common.flops import training_flops_per_token
from common.models import validate_model_config
from common.recipes import image_tokenizer
from common.tasks import mixed_modal
from common.tasks.mixed_modal import mixed_modal_task
from common.train.__main__ import cli as common_cli
from mot.evaluate import generate_captions
from mot.model import DenseWithModality, MoTLM, norm_placement, validate_mot_config
from mot.transfusion import TransfusionLM, transfusion_loss

SAMPLE_SEED = 4242  # the scenes captioned in the eval log (fixed, so captions can be compared across evals)


def resolve(cfg):
  """Fills what model.* derives from data.* (in place; returns cfg): the setting, one weight set per modality,
  the Transfusion patch shapes (patch_dim = 3 x data.patch_size^2, patches_per_image = (data.image_size /
  data.patch_size)^2) and the mixed vocabulary (`common.tasks.mixed_modal.resolve`)."""
  m, d = cfg.model, cfg.data
  m.setting = d.setting
  if m.get("name") == "mot":
    m.n_modalities = len(d.modalities)
  if d.setting == "transfusion":
    patch, side = int(d.patch_size), int(d.image_size)
    m.update(patch_dim=3 * patch * patch, patches_per_image=(side // patch) ** 2)
  images = d.setting == "chameleon" and "image" in d.modalities
  return mixed_modal.resolve(cfg, image_tokenizer.codebook_size(d) if images else 0)


def validate(cfg) -> None:
  """Checks of a resolved config (`resolve`), naming the key."""
  validate_data_config(cfg.data)
  m = cfg.model
  require(m.get("name") in ("mot", "dense_lm"), "model.name", f"must be 'mot' or 'dense_lm', got '{m.get('name')}'")
  if cfg.data.setting == "transfusion":
    require(m.name == "mot", "model.name", "the Transfusion setting's dense baseline is model.name='mot' with "
            "model.untied=False (the same wrapper, FLOP count included, with one weight group)")
  if m.name == "dense_lm":
    require(norm_placement(m) == "pre", "model.norm_placement", "the common dense LM is pre-norm; the post-norm "
            "dense baseline is model.name='mot' with model.untied=False")
  (validate_mot_config if m.name == "mot" else validate_model_config)(m)


def transfusion_summary(sums: dict, loss_weight: float) -> dict:
  """Eval values of the Transfusion loss sums over the eval set: `loss_text` (nats per text target) with its
  `perplexity`, `loss_image` (noise MSE per image patch, without lambda), and `loss`, the objective of
  Transfusion sec. 3.3 over the whole set: loss_text + lambda loss_image (a term absent from the set: 0)."""
  out = {}
  if sums.get("weight/text", 0.0) > 0:
    out["loss_text"] = sums["nll/text"] / sums["weight/text"]
    out["perplexity"] = math.exp(min(out["loss_text"], 50.0))
  if sums.get("weight/image", 0.0) > 0:
    out["loss_image"] = sums["mse/image"] / sums["weight/image"]
  out["loss"] = out.get("loss_text", 0.0) + loss_weight * out.get("loss_image", 0.0)
  return out


def caption_samples(cfg, data):
  """model -> {scene caption: generated caption} for `eval.sample_images` fixed scenes (None when 0)."""
  n = int(cfg.eval.get("sample_images", 0))
  if n <= 0 or "image" not in cfg.data.modalities:
    return None
  image_size = int(cfg.data.image_size)
  sampled = scenes.sample_scenes(n, SAMPLE_SEED, image_size)
  images = scenes.render_batch(sampled, image_size)

  def samples(model):
    texts = generate_captions(model, data.vocab, images, image_tokenizer=data.image_tokenizer,
                              patch_size=int(cfg.data.patch_size))
    return {f"[image: {scenes.caption(s)}] -> ": t for s, t in zip(sampled, texts)}

  return samples


def build_mot_model(model_cfg, seed: int):
  """The model of `model.name` ('mot' | 'dense_lm') and `model.setting` ('chameleon' | 'transfusion').
  Chameleon: `mot.model.MoTLM`, whose dense baseline is `model.untied=False` (one weight group), or with
  pre-norms the common dense LM. Transfusion: `mot.transfusion.TransfusionLM`, whose dense baseline is
  `model.untied=False`."""
  rngs = nnx.Rngs(params=seed)
  name = model_cfg.name
  if name not in ("mot", "dense_lm"):
    raise ConfigError(f"config key 'model.name': unknown model '{name}' (known: mot, dense_lm)")
  if model_cfg.get("setting", "chameleon") == "transfusion":
    return TransfusionLM(model_cfg, rngs=rngs)
  return DenseWithModality(model_cfg, rngs=rngs) if name == "dense_lm" else MoTLM(model_cfg, rngs=rngs)


def make_task(cfg):
  """The Task of the shared loop (`common.tasks.mixed_modal`) for `build_mot_model`, on a resolved config."""
  transfusion = cfg.data.setting == "transfusion"
  task = mixed_modal_task(cfg, build_mot_model, loss_fn=transfusion_loss if transfusion else None,
                          flops_per_token=training_flops_per_token, image_tokenizer=image_tokenizer.for_data(cfg.data))
  task = dataclasses.replace(task, eval_samples=caption_samples(cfg, task.data))
  if transfusion:
    task = dataclasses.replace(task, eval_summary=functools.partial(
        transfusion_summary, loss_weight=float(cfg.model.diffusion.loss_weight)))
  return task


def cli() -> None:
  common_cli(make_task, validate, resolve)


if __name__ == "__main__":
  cli()
