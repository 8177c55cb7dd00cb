"""`python -m ease.train --config=ease/configs/tiny.py:variant=ease,level=sentence --workdir=DIR [--config.K=V]`

Trains one EASE model (or a baseline: `variant=abstractive`, the whole document; `variant=lead`, the first
sentences) end to end on the common trainer. The objective is the summary's cross-entropy given the evidence
plus beta times the KL of the extractor's mask to the prior (ease/model.py); metrics.jsonl carries `nll`,
`kl` and `keep` (the share of document tokens kept), and eval/* the same with the hard top-k evidence at
`model.budget`. Real data: `--config.data.source=jsonl --config.data.path=FILE.jsonl --config.data.tokenizer=byte`.
A pretrained abstractor: `--config.model.init_from=NAME`, a checkpoint-library entry (e.g. a Llama checkpoint
imported with `python -m common.hub import_hf`); its architecture replaces the abstractor's keys of `model.*`
and its tokenizer replaces `data.tokenizer`.
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from common.config import require
from common.models import checkpoint_library as hub
from common.tasks.base import Task
from common.tasks.sft import adopt_hub_base
from common.tokenizers import Tokenizer
from common.train.__main__ import cli, main as train_main
from ease import data as ease_data
from ease.model import EASE_KEYS, build_model, flops_per_row, validate_model_config

_DATA: dict[str, ease_data.SummaryData] = {}


def pretrained_tokenizer(cfg) -> Tokenizer | None:
  """The tokenizer stored with the abstractor's checkpoint-library entry (`model.init_from`), if any."""
  name = cfg.model.get("init_from", "")
  return hub.entry_tokenizer(name) if name else None


def data_for(cfg) -> ease_data.SummaryData:
  """The encoded data of a config, built once per process for each (data section, abstractor entry, batch,
  seed)."""
  key = json.dumps([cfg.data.to_dict(), cfg.model.get("init_from", ""), int(cfg.train.batch_size),
                    int(cfg.train.seed)], sort_keys=True)
  if key not in _DATA:
    _DATA.clear()
    _DATA[key] = ease_data.SummaryData(cfg.data, batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed),
                                       pretrained=pretrained_tokenizer(cfg))
  return _DATA[key]


def adopt_abstractor(cfg) -> None:
  """With `model.init_from`, the abstractor's keys of `model.*` become the entry's model config (as every
  fine-tuning package adopts its hub base: `common.tasks.sft.adopt_hub_base`); EASE's own keys stay."""
  own = {k: v for k, v in cfg.model.to_dict().items() if k in EASE_KEYS}
  adopt_hub_base(cfg)
  if own.get("init_from"):
    cfg.model = ml_collections.ConfigDict({**cfg.model.to_dict(), **own})


def resolve(cfg):
  """Fills what the model takes from the entry it starts from and from the data (in place; returns it): a
  checkpoint-library abstractor's architecture (`adopt_abstractor`); else the vocabulary (the tokenizer's ids
  and the two layout ids, rounded up to a multiple of 8); the document length and the sentence count."""
  ease_data.check_data(cfg.data)
  adopt_abstractor(cfg)
  if int(cfg.model.vocab_size) == 0:
    tokenizer, sep_id, bos_id = ease_data.tokenizer_for(cfg.data, pretrained_tokenizer(cfg))
    needed = max(tokenizer.vocab_size, sep_id + 1, bos_id + 1)
    cfg.model.vocab_size = -(-needed // 8) * 8
  if int(cfg.model.doc_len) == 0:
    cfg.model.doc_len = int(cfg.data.doc_len)
  if int(cfg.model.max_units) == 0:
    cfg.model.max_units = int(cfg.data.max_units)
  return cfg


def validate(cfg) -> None:
  ease_data.check_data(cfg.data)
  validate_model_config(cfg.model)
  require(int(cfg.model.doc_len) == int(cfg.data.doc_len), "model.doc_len",
          f"must equal data.doc_len={cfg.data.doc_len}")
  context = int(cfg.model.get("max_len", 0))
  rows = int(cfg.data.doc_len) + int(cfg.data.summary_len)
  require(not context or rows <= context, "data.doc_len",
          f"a row of data.doc_len + data.summary_len = {rows} tokens is longer than the abstractor's context "
          f"(model.max_len={context})")


def loss_fn(model, batch):
  """(summed objective, summary tokens, metric sums): the evidence-conditioned cross-entropy plus beta x the
  per-unit KL of each document, weighted by its summary tokens, so objective / tokens = mean nll + beta x KL.
  Train batches (batch['hard'] == 0) sample a relaxed mask; eval batches use the hard top-k evidence."""
  unit_mask, kl = model.unit_mask(batch, hard=batch["hard"])
  keep = model.keep(batch, unit_mask)
  logits = model(batch["inputs"], keep)
  mask = batch["loss_mask"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * mask
  tokens = mask.sum(-1)
  kept = jnp.sum(keep * batch["doc_mask"], -1) / jnp.maximum(batch["doc_mask"].sum(-1), 1)
  kl_sum = jnp.sum(kl * tokens)
  total = nll.sum() + float(model.cfg.beta) * kl_sum
  return total, tokens.sum(), dict(nll=nll.sum(), kl=kl_sum, keep=jnp.sum(kept * tokens))


def eval_summary(sums: dict) -> dict:
  return {k: sums[k] / sums["weight"] for k in ("nll", "kl", "keep")}


def make_task(cfg) -> Task:
  """The Task of a resolved config: a new EASE model, its abstractor a checkpoint-library entry's parameters
  with `model.init_from`."""
  data = data_for(cfg)
  require(int(cfg.model.vocab_size) >= data.tokenizer.vocab_size, "model.vocab_size",
          f"{cfg.model.vocab_size} is smaller than the tokenizer's {data.tokenizer.vocab_size} ids")
  seq_len, seed = data.seq_len, int(cfg.train.seed)
  if cfg.model.get("init_from"):
    base = nnx.split(hub.load(cfg.model.init_from)[1])
    build = lambda: build_model(cfg.model, seed=seed, abstractor=nnx.merge(*base))
  else:
    build = lambda: build_model(cfg.model, seed=seed)
  return Task(build_model=build, loss_fn=loss_fn,
              data=data, train_flops_per_example=flops_per_row(cfg.model, seq_len),
              units_per_example=seq_len, eval_summary=eval_summary)


def main(argv) -> int:
  """The command line on `argv` (tests call it in-process); raises ConfigError on bad input."""
  return train_main(argv, make_task, validate, resolve)


if __name__ == "__main__":
  cli(make_task, validate, resolve)
