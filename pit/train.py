"""`python -m pit.train --config=pit/configs/tiny.py:variant=pit --workdir=DIR [--config.KEY=VALUE ...]`

Trains one variant of Jiang et al. (2024) on the common trainer: the variant's data schedule (pit/data.py,
`VARIANTS`: phases of documents, QA pairs or both, each for its epochs) in one run, documents trained on all
tokens and QA pairs on answers only; eval/loss is the answer loss on the held-out test questions.
`train.steps` is derived from the schedule: the sum of its phases' steps.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil

import numpy as np
from flax import nnx

from common.config import ConfigError, require
from common.data.phases import Phase, PhasedData, steps_for_epochs
from common.data.sft import OVERLONG_POLICIES, pack_examples
from common.data.train_tokenizer import train as train_spm
from common.flops import flops_for
from common.models import build_model, padded_vocab_size, validate_model_config
from common.models import checkpoint_library as hub
from common.tasks.base import Task
from common.tasks.sft import adopt_hub_base
from common.tasks.lm import next_token_loss
from common.tokenizers import Tokenizer, load_tokenizer
from common.train.__main__ import cli, main as train_main
from pit import data as pit_data

TOKENIZERS = ("world", "byte", "spm", "llama3")
SHARDS = 32  # text files the world tokenizer trains on


def world_tokenizer_path(data_cfg, corpus: pit_data.Corpus) -> str:
  """A SentencePiece model trained once on the corpus' texts, cached under data.cache_dir by their hash."""
  texts = corpus.texts()
  digest = hashlib.sha256("\n\0".join(texts).encode("utf-8")).hexdigest()[:16]
  folder = os.path.join(os.path.expanduser(data_cfg.cache_dir), "pit_tokenizers", f"{digest}_v{data_cfg.vocab_size}")
  model = os.path.join(folder, "world.model")
  if not os.path.exists(model):
    shards = os.path.join(folder, f"text{os.getpid()}")
    os.makedirs(shards, exist_ok=True)
    for s in range(SHARDS):  # many files: the corpus reader holds out a small share of files by path hash
      with open(os.path.join(shards, f"{s}.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(texts[s::SHARDS]) + "\n")
    prefix = os.path.join(folder, f"world.tmp{os.getpid()}")
    try:
      train_spm(prefix + ".model", vocab_size=int(data_cfg.vocab_size), path=os.path.join(shards, "*.txt"))
    except RuntimeError as e:
      raise ConfigError(f"config key 'data.vocab_size': sentencepiece: {str(e).splitlines()[0]}") from None
    finally:
      shutil.rmtree(shards, ignore_errors=True)
    os.replace(prefix + ".vocab", os.path.join(folder, "world.vocab"))
    os.replace(prefix + ".model", model)
  return model


def tokenizer_for(cfg, corpus: pit_data.Corpus | None = None) -> Tokenizer:
  """A hub base's tokenizer when it stored one, else `data.tokenizer` ('world': trained on the corpus)."""
  stored = hub.entry_tokenizer(cfg.model.init_from) if cfg.model.init_from else None
  if stored is not None:
    return stored
  if cfg.data.tokenizer == "world":
    return load_tokenizer("spm", world_tokenizer_path(cfg.data, corpus or pit_data.corpus_for(cfg.data)))
  return load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)


def _pack(examples: list, data_cfg, what: str) -> dict[str, np.ndarray]:
  rows, _ = pack_examples(examples, int(data_cfg.seq_len), overlong=data_cfg.overlong)
  if not len(rows["targets"]):
    raise ConfigError(f"config key 'data.variant': the {what} phase has no example with a trained token")
  return rows


def build_schedule(cfg, corpus: pit_data.Corpus, tokenizer: Tokenizer) -> PhasedData:
  """The variant's phases packed into rows (each phase's examples shuffled by data.example_seed first), with
  steps from their epochs; after the base phase each phase also replays base examples, `data.replay` as many
  as its own (see README: the stand-in for a large model's robustness). Eval rows are the held-out test
  questions (closed-book, answers trained)."""
  sets = pit_data.example_sets(corpus, tokenizer, answer_weight=float(cfg.data.answer_weight))
  batch, replay = int(cfg.train.batch_size), float(cfg.data.replay)
  phases = []
  for index, spec in enumerate(pit_data.phase_specs(cfg.data.variant, cfg.data)):
    examples = [e for name in spec.sets for e in sets[name]]
    if not examples:  # real data has no old entities: no base phase
      continue
    if index and replay > 0 and sets["base"]:  # base examples replayed in each later phase
      picks = np.random.default_rng((int(cfg.data.example_seed), index, 1)).permutation(len(sets["base"]))
      examples += [sets["base"][i] for i in np.resize(picks, math.ceil(replay * len(examples)))]
    order = np.random.default_rng((int(cfg.data.example_seed), index)).permutation(len(examples))
    rows = _pack([examples[i] for i in order], cfg.data, spec.name)
    phases.append(Phase(spec.name, rows, steps_for_epochs(len(rows["targets"]), spec.epochs, batch)))
  if not phases:
    raise ConfigError(f"config key 'data.variant': '{cfg.data.variant}' has no phase with data")
  eval_rows = _pack([pit_data.encode_qa(q, tokenizer) for q in corpus.test_qa], cfg.data, "eval")
  return PhasedData(phases, eval_rows, batch_size=batch, seed=int(cfg.train.seed))


_BUILT: dict[str, tuple] = {}


def schedule_for(cfg) -> tuple[PhasedData, Tokenizer, pit_data.Corpus]:
  """`build_schedule` of a config, built once per process for each (data, model base, batch, seed): `resolve`
  needs its length and `make_task` its rows."""
  key = json.dumps([cfg.data.to_dict(), cfg.model.get("init_from", ""), int(cfg.train.batch_size),
                    int(cfg.train.seed)], sort_keys=True)
  if key not in _BUILT:
    corpus = pit_data.corpus_for(cfg.data)
    tokenizer = tokenizer_for(cfg, corpus)
    _BUILT.clear()
    _BUILT[key] = (build_schedule(cfg, corpus, tokenizer), tokenizer, corpus)
  return _BUILT[key]


def resolve(cfg):
  """Fills what the config derives (in place; returns it): a hub base's model config; model.vocab_size 0 as
  the tokenizer's ids padded to a multiple of 128; train.steps as the schedule's length."""
  check_data(cfg.data)
  adopt_hub_base(cfg)
  data, tokenizer, _ = schedule_for(cfg)
  if int(cfg.model.vocab_size) == 0:
    cfg.model.vocab_size = padded_vocab_size(tokenizer.vocab_size)
  cfg.train.steps = data.total_steps
  return cfg


def check_data(d) -> None:
  """The checks of `data.*`, each naming its key: run before any text is generated or read."""
  require(d.variant in pit_data.VARIANTS, "data.variant",
          f"unknown variant '{d.variant}' (valid: {', '.join(pit_data.VARIANTS)})")
  require(d.tokenizer in TOKENIZERS, "data.tokenizer", f"must be one of {TOKENIZERS}, got '{d.tokenizer}'")
  require(d.overlong in OVERLONG_POLICIES, "data.overlong", f"must be one of {OVERLONG_POLICIES}")
  require(d.setting in pit_data.SETTINGS, "data.setting", f"must be one of {pit_data.SETTINGS}, got '{d.setting}'")
  for key in ("doc_epochs", "qa_epochs", "base_epochs", "answer_weight"):
    require(float(d[key]) > 0, f"data.{key}", f"must be positive, got {d[key]}")
  require(float(d.replay) >= 0, "data.replay", f"must be >= 0, got {d.replay}")
  for key in ("train_entities", "test_entities", "docs_per_entity"):
    require(int(d[key]) > 0, f"data.{key}", f"must be positive, got {d[key]}")
  require(int(d.old_per_kind) >= 0, "data.old_per_kind", f"must be >= 0, got {d.old_per_kind}")
  require(int(d.seq_len) > 1, "data.seq_len", f"must be > 1, got {d.seq_len}")


def validate(cfg) -> None:
  """Checks of a resolved config, each naming its key."""
  check_data(cfg.data)
  validate_model_config(cfg.model)


def make_task(cfg) -> Task:
  """The Task of a resolved config: a random dense LM (or the hub base's parameters) on the variant's
  schedule, next-token loss weighted by the loss mask."""
  data, tokenizer, _ = schedule_for(cfg)
  require(cfg.model.vocab_size >= tokenizer.vocab_size, "model.vocab_size",
          f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
  print(f"pit data: variant {cfg.data.variant}, " + ", ".join(
      f"{p.name} {p.num_rows} rows x {p.steps} steps" for p in data.phases) + f"; {data.num_eval_rows} eval rows",
      flush=True)
  seed = int(cfg.train.seed)
  if cfg.model.init_from:
    base = nnx.split(hub.load(cfg.model.init_from)[1])
    build = lambda: nnx.merge(*base)
  else:
    build = lambda: build_model(cfg.model, seed=seed)
  seq_len = data.seq_len
  return Task(build_model=build, loss_fn=next_token_loss, data=data,
              train_flops_per_example=flops_for(cfg.model, seq_len).training * seq_len, units_per_example=seq_len)


def main(argv) -> int:
  """The command line on `argv` (tests call it in-process); raises ConfigError on bad input."""
  return train_main(argv, make_task, validate, resolve)


if __name__ == "__main__":
  cli(make_task, validate, resolve)
