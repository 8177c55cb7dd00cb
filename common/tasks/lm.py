"""Next-token language modelling as a training task: the dense LM on packed rows of `common.data`."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from common.data import LMData
from common.data.vocab import vocab_size
from common.flops import training_flops_per_token
from common.nn.moe import moe_loss_terms
from common.models import build_model, padded_vocab_size, validate_model_config
from common.tasks.base import Task

BYTE_OFFSET = 3  # seqio's ByteVocabulary: pad 0, EOS 1, unk 2, then byte b as b + 3


def next_token_loss(model, batch):
  """Summed cross-entropy over non-padding targets plus, for models with MoE layers, their auxiliary
  (balancing, z-) losses times the token count; the token count; and, with MoE, `nll` (cross-entropy
  alone) and the routing statistics as metric sums."""
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"]
  nll_sum, weight = jnp.sum(nll * mask), jnp.sum(mask)
  aux, sums = moe_loss_terms(model, weight)
  if sums:
    sums = dict(nll=nll_sum, **sums)
  return nll_sum + aux, weight, sums


def byte_lm_loss(model, batch):
  """`next_token_loss` on the byte vocabulary, with `byte_targets` (the targets that are bytes, not EOS) among
  the metric sums for bits per byte."""
  total, weight, sums = next_token_loss(model, batch)
  return total, weight, dict(sums, byte_targets=jnp.sum(batch["loss_mask"] * (batch["targets"] >= BYTE_OFFSET)))


def nats_summary(sums: dict, *, bytes_per_target: bool) -> dict:
  """Eval values from summed metrics; `nll` is the cross-entropy without auxiliary losses (= loss for dense
  models); on the byte vocabulary (`byte_lm_loss`) bits per byte: the cross-entropy of all targets,
  end-of-document predictions included, over ln 2 x the byte targets (the bytes of the text scored)."""
  nll_sum = sums.get("nll", sums["loss"])
  out = {"nll": nll_sum / sums["weight"]} if "nll" in sums else {}
  if bytes_per_target and sums.get("byte_targets", 0) > 0:
    out["bpb"] = nll_sum / sums["byte_targets"] / math.log(2)
  return out


def resolve(cfg):
  """Fills the values the config derives (in place; returns it): model.vocab_size 0 means the vocabulary of
  `data.vocab`, padded to a multiple of 128 so it shards evenly; data.shards 0 in a multi-process run means one
  training-data shard per process. Read from data.*, before any row is built."""
  if int(cfg.model.vocab_size) == 0:
    cfg.model.vocab_size = padded_vocab_size(vocab_size(cfg.data))
  if jax.process_count() > 1 and not int(cfg.data.get("shards", 0)):
    cfg.data.shards = jax.process_count()  # recorded, so a resume on another process count is a config change
  return cfg


def validate(cfg) -> None:
  """The dense LM's checks of a resolved config (`resolve`), naming the key."""
  validate_model_config(cfg.model)


def lm_task(cfg) -> Task:
  """The Task of a resolved config (`resolve`)."""
  data = LMData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  seq_len = cfg.data.seq_len
  is_bytes = cfg.data.vocab == "byte"
  return Task(
      build_model=lambda: build_model(cfg.model, seed=cfg.train.seed),
      loss_fn=byte_lm_loss if is_bytes else next_token_loss,
      data=data,
      train_flops_per_example=training_flops_per_token(cfg.model, seq_len) * seq_len,
      units_per_example=seq_len,
      eval_summary=functools.partial(nats_summary, bytes_per_target=is_bytes),
  )
