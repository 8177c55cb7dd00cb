"""Next-token language modelling as a training task: the dense LM on packed rows of `common.data`."""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from common.data import LMData
from common.flops import training_flops_per_token
from common.models import build_model, validate_model_config
from common.train.loop import Task


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def next_token_loss(model, batch):
  """Summed cross-entropy over non-padding targets, their count, and no extra sums."""
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"]
  return jnp.sum(nll * mask), jnp.sum(mask), {}


def resolve_vocab_size(cfg, data: LMData) -> None:
  """model.vocab_size 0 means the data vocabulary, padded to a multiple of 128 so it shards evenly."""
  if cfg.model.vocab_size == 0:
    cfg.model.vocab_size = round_up(data.vocab_size, 128)


def validate_model_early(cfg) -> None:
  """Checks model.* before the data is loaded (vocab_size 0, resolved from the data later, passes here)."""
  probe = cfg.model.copy_and_resolve_references()
  if probe.vocab_size == 0:
    probe.vocab_size = 128
  validate_model_config(probe)


def lm_task(cfg) -> Task:
  data = LMData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  resolve_vocab_size(cfg, data)
  seq_len = cfg.data.seq_len
  is_bytes = cfg.data.vocab == "byte"
  return Task(
      build_model=lambda: build_model(cfg.model, seed=cfg.train.seed),
      loss_fn=next_token_loss,
      data=data,
      train_flops_per_example=training_flops_per_token(cfg.model, seq_len) * seq_len,
      units_per_example=seq_len,
      # With the byte vocabulary every target is one byte (or an end-of-document id): nats -> bits.
      eval_summary=(lambda s: {"bpb": s["loss"] / s["weight"] / math.log(2)}) if is_bytes else None,
  )
