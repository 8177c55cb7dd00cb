"""Mixed-modal next-token training (the Chameleon setting of MoT sec. 3 and MoMa sec. 4) with the loss of
each modality reported apart, since the papers compare models per modality (MoT fig. 3, MoMa table 2).

Losses are attributed by the modality of the target token: the loss "of images" is the cross-entropy of
predicting image tokens, whatever precedes them.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from common.config import ConfigError, require
from common.data.mixed_modal import MODALITIES, MixedModalData, MixedVocab
from common.flops import training_flops_per_token
from common.models import DenseLM, padded_vocab_size
from common.nn.moe import moe_loss_terms
from common.tasks.base import Task


def per_modality_nll(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(nll summed over loss_mask, its weight, {'nll/<m>': sum, 'weight/<m>': count} per modality of
  MODALITIES, by `target_modality`). logits [B, L, V] (any float dtype, taken in f32)."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  sums = {}
  for m, name in enumerate(MODALITIES):
    selected = mask * (batch["target_modality"] == m)
    sums[f"nll/{name}"] = jnp.sum(nll * selected)
    sums[f"weight/{name}"] = jnp.sum(selected)
  return jnp.sum(nll * mask), jnp.sum(mask), sums


def train_view(sums: dict[str, jax.Array], weight: jax.Array) -> dict[str, jax.Array]:
  """`loss_<m>`: this batch's mean nll of modality m times `weight`, so that the train step's division by
  the token count reports the mean itself (0 when the batch has no target of m)."""
  return {f"loss_{name}": weight * sums[f"nll/{name}"] / jnp.maximum(sums[f"weight/{name}"], 1.0)
          for name in MODALITIES}


def model_logits(model, batch: dict) -> jax.Array:
  """Mixed-modal models take the modality of each input; the dense baseline ignores it (MoT's baseline)."""
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  return model(*args) if isinstance(model, DenseLM) else model(*args, batch["modality"])


def mixed_modal_loss(model, batch: dict):
  """Next-token cross-entropy over loss_mask plus MoE auxiliary losses (models with MoE layers); metric
  sums of each modality."""
  logits = model_logits(model, batch)
  nll_sum, weight, sums = per_modality_nll(logits, batch)
  aux, moe_sums = moe_loss_terms(model, weight)
  sums.update(train_view(sums, weight))
  if moe_sums:
    sums.update(nll=nll_sum, **moe_sums)
  return nll_sum + aux, weight, sums


def modality_summary(sums: dict) -> dict:
  """Eval values: `loss_<m>` (mean nats per target token of modality m) for every modality present, and
  `nll` (cross-entropy without auxiliary losses) for MoE models."""
  out = {f"loss_{name}": sums[f"nll/{name}"] / sums[f"weight/{name}"]
         for name in MODALITIES if sums.get(f"weight/{name}", 0.0) > 0}
  if "nll" in sums:
    out["nll"] = sums["nll"] / sums["weight"]
  return out


def resolve(cfg, image_codebook: int = 0):
  """Fills model.vocab_size 0 with the mixed vocabulary of data.* padded to a multiple of 128 (in place; returns
  cfg), before any data is built: text and markers, then `image_codebook` image codes (the image tokenizer's
  codebook; Transfusion's continuous images take one placeholder id), then data.audio_codebook audio codes."""
  d = cfg.data
  if int(cfg.model.vocab_size) == 0:
    images = 0 if "image" not in d.modalities else int(image_codebook) if d.setting == "chameleon" else 1
    audio = int(d.audio_codebook) if "audio" in d.modalities else 0
    cfg.model.vocab_size = padded_vocab_size(MixedVocab(images, audio).size)
  return cfg


def mixed_modal_task(cfg, build_model: Callable, loss_fn=None,
                     flops_per_token: Callable[..., float] | None = None, *, image_tokenizer=None) -> Task:
  """The Task of a mixed-modal trainer on a resolved config (`resolve`). `build_model(model_cfg, seed=...)`
  builds the model; `loss_fn` defaults
  to `mixed_modal_loss` (Chameleon setting; Transfusion needs its diffusion loss); `flops_per_token(model_cfg,
  seq_len)` defaults to `common.flops.training_flops_per_token`; `image_tokenizer` overrides data.image_tokenizer."""
  if loss_fn is None and cfg.data.setting == "transfusion":
    raise ConfigError("config key 'data.setting': 'transfusion' needs a loss_fn with the diffusion loss "
                      "(the trainer of a Transfusion model passes it)")
  data = MixedModalData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                        image_tokenizer=image_tokenizer)
  require(data.vocab_size <= int(cfg.model.vocab_size), "model.vocab_size",
          f"{cfg.model.vocab_size} is smaller than the data's {data.vocab_size} ids")
  seq_len = int(cfg.data.seq_len)
  per_token = (flops_per_token or training_flops_per_token)(cfg.model, seq_len)
  return Task(
      build_model=lambda: build_model(cfg.model, seed=cfg.train.seed),
      loss_fn=loss_fn or mixed_modal_loss,
      data=data,
      train_flops_per_example=per_token * seq_len,
      units_per_example=seq_len,
      eval_summary=modality_summary,
  )
