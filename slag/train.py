"""`python -m slag.train --config=slag/configs/tiny.py:stage=base|learned_opt --workdir=DIR [--config.K=V ...]`

The two training stages of Hase et al. (2023) on the common trainer:
  stage=base         the true/false classifier (dense LM + head on the last token) on every statement of the
                     beliefs (slag/data.py); eval/acc is its accuracy on the beliefs' main statements;
  stage=learned_opt  the learned optimizer (slag/model.py HyperNetwork) on episodes of updates to the training
                     beliefs with the SLAG objective (slag/update.py), the classifier of
                     `learned_opt.base_workdir` frozen; eval/* on episodes of the evaluation beliefs.
The learned-optimizer run takes `model.*` and `data.*` from its base run. Real data:
`--config.data.path=FILE.jsonl --config.data.format=fever|zsre|leapofthought`, a pretrained LM with
`--config.model.init_from=NAME` (its tokenizer is used).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.config import ConfigError, require
from common.flops import flops_for
from common.models import checkpoint_library as hub
from common.models import padded_vocab_size, validate_model_config
from common.tasks.base import Task
from common.tasks.sft import adopt_hub_base
from common.tokenizers import Tokenizer, load_tokenizer
from common.train.__main__ import cli, main as train_main
from common.train.restore import load_run_model, read_run_config
from slag import data as slag_data
from slag.model import (BeliefClassifier, HyperNetwork, LearnedOptimizer, hyper_param_filter, target_filter,
                        validate_opt_config)
from slag.update import cross_entropy, slag_loss_fn

STAGES = ("base", "learned_opt")
TOKENIZERS = ("byte", "spm")


def tokenizer_for(cfg) -> Tokenizer:
  stored = hub.entry_tokenizer(cfg.model.init_from) if cfg.model.init_from else None
  return stored if stored is not None else load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)


def check_config(cfg) -> None:
  """The checks that come before any data is read, each naming its key."""
  require(cfg.stage in STAGES, "stage", f"unknown stage '{cfg.stage}' (valid: {', '.join(STAGES)})")
  d = cfg.data
  require(d.format in slag_data.FORMATS, "data.format", f"must be one of {slag_data.FORMATS}, got '{d.format}'")
  require(d.tokenizer in TOKENIZERS, "data.tokenizer", f"must be one of {TOKENIZERS}, got '{d.tokenizer}'")
  for key in ("num_entities", "seq_len", "cond_len"):
    require(int(d[key]) > 1, f"data.{key}", f"must be > 1, got {d[key]}")
  require(0 < float(d.eval_fraction) < 1, "data.eval_fraction", f"must be in (0, 1), got {d.eval_fraction}")
  require(0 <= int(d.false_per_entity) < len(slag_data.CATEGORIES), "data.false_per_entity",
          f"must be in [0, {len(slag_data.CATEGORIES) - 1}], got {d.false_per_entity}")
  if cfg.stage == "learned_opt":
    require(bool(cfg.learned_opt.base_workdir), "learned_opt.base_workdir", "the base run's workdir is needed")
    for key in ("episodes", "eval_episodes", "sequential", "num_other"):
      require(int(cfg.learned_opt[key]) >= 1, f"learned_opt.{key}", f"must be >= 1, got {cfg.learned_opt[key]}")


def resolve(cfg):
  """Fills what the config derives (in place; returns it). Base: a hub base's model config, the vocabulary.
  Learned optimizer: `model.*` and `data.*` of the base run."""
  check_config(cfg)
  if cfg.stage == "learned_opt":
    base = read_run_config(cfg.learned_opt.base_workdir, "learned_opt.base_workdir")
    require(base.get("stage") == "base", "learned_opt.base_workdir",
            f"'{cfg.learned_opt.base_workdir}' is not a stage=base run")
    cfg.model, cfg.data = base.model, base.data
  adopt_hub_base(cfg)
  if int(cfg.model.vocab_size) == 0:
    cfg.model.vocab_size = padded_vocab_size(tokenizer_for(cfg).vocab_size)
  cfg.learned_opt.n_layers = int(cfg.model.n_layers)
  return cfg


def validate(cfg) -> None:
  check_config(cfg)
  validate_model_config(cfg.model)
  require(not cfg.model.get("scan_layers", False), "model.scan_layers", "updates edit unrolled blocks; set false")
  validate_opt_config(cfg.learned_opt, cfg.model)


_CACHE: dict[str, object] = {}


def cached(key: list, make):
  """One value per process for each key (the beliefs, the base predictions): resolve, make_task and the
  study's scoring all ask for them."""
  text = json.dumps(key, sort_keys=True, default=str)
  if text not in _CACHE:
    if len(_CACHE) > 8:
      _CACHE.clear()
    _CACHE[text] = make()
  return _CACHE[text]


def beliefs_for(cfg) -> slag_data.BeliefSet:
  return cached(["beliefs", cfg.data.to_dict()], lambda: slag_data.belief_set(cfg.data))


def build_classifier(cfg) -> BeliefClassifier:
  """A new classifier (seeded by train.seed) or, with model.init_from, one on the hub base's LM."""
  model = BeliefClassifier(cfg.model, rngs=nnx.Rngs(params=int(cfg.train.seed)))
  if cfg.model.init_from:
    model.lm = hub.load(cfg.model.init_from)[1]
  return model


def load_base(base_workdir: str) -> tuple[BeliefClassifier, object]:
  """The trained classifier of a base run and that run's config (read once per process)."""
  def make():
    base_cfg = read_run_config(base_workdir, "learned_opt.base_workdir")
    model = load_run_model(base_workdir, base_cfg, lambda: build_classifier(base_cfg),
                           key="learned_opt.base_workdir")[0]
    return model, base_cfg
  return cached(["base", base_workdir], make)


def predict(classifier: BeliefClassifier, tokens: np.ndarray, lengths: np.ndarray, batch: int = 256) -> np.ndarray:
  """Predicted labels of right-padded rows."""
  graphdef, state = nnx.split(classifier)
  run = jax.jit(lambda s, t, n: jnp.argmax(nnx.merge(graphdef, s)(t, n), -1))
  return np.concatenate([np.asarray(run(state, tokens[i:i + batch], lengths[i:i + batch]))
                         for i in range(0, len(tokens), batch)]) if len(tokens) else np.zeros(0, np.int32)


def classifier_loss(model, batch):
  """Summed cross-entropy of the statements' labels; metric `correct` (accuracy once divided by the weight)."""
  logits = model(batch["tokens"], batch["lengths"])
  w = batch["weight"]
  nll = cross_entropy(logits, batch["labels"], w) * jnp.sum(w)
  return nll, jnp.sum(w), dict(correct=jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * w))


def accuracy_summary(sums: dict) -> dict:
  return dict(acc=sums["correct"] / sums["weight"])


def episode_summary(sums: dict) -> dict:
  return {k: sums[k] / sums["weight"] for k in ("update_success", "retain")}


def base_task(cfg) -> Task:
  beliefs = beliefs_for(cfg)
  tokenizer = tokenizer_for(cfg)
  seq_len = int(cfg.data.seq_len)
  texts, labels = zip(*beliefs.statements)
  tokens, lengths = slag_data.encode(list(texts), tokenizer, seq_len)
  train = dict(tokens=tokens, lengths=lengths, labels=np.array(labels, np.int32),
               weight=np.ones(len(labels), np.float32))
  main_tokens, main_lengths = slag_data.encode([b.main for b in beliefs.beliefs], tokenizer, seq_len)
  held = dict(tokens=main_tokens, lengths=main_lengths, labels=np.array([b.label for b in beliefs.beliefs], np.int32),
              weight=np.ones(len(beliefs.beliefs), np.float32))
  data = slag_data.ArrayData(train, held, batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed))
  print(f"slag base: {len(labels)} statements, {len(beliefs.beliefs)} beliefs", flush=True)
  return Task(build_model=lambda: build_classifier(cfg), loss_fn=classifier_loss, data=data,
              train_flops_per_example=flops_for(cfg.model, seq_len).training * seq_len, units_per_example=seq_len,
              eval_summary=accuracy_summary)


def base_points(cfg, split: str) -> tuple[dict, list[slag_data.Belief], np.ndarray]:
  """(update points, beliefs, base predictions) of a split, from the base run of `learned_opt.base_workdir`."""
  def make():
    classifier, _ = load_base(cfg.learned_opt.base_workdir)
    tokenizer = tokenizer_for(cfg)
    beliefs = beliefs_for(cfg).split(split)
    if not beliefs:
      raise ConfigError(f"config key 'data.eval_fraction': the '{split}' split has no beliefs")
    main, lengths = slag_data.encode([b.main for b in beliefs], tokenizer, int(cfg.data.seq_len))
    preds = predict(classifier, main, lengths)
    points = slag_data.point_arrays(beliefs, preds, tokenizer, int(cfg.data.seq_len), int(cfg.data.cond_len))
    return points, beliefs, preds
  return cached(["points", cfg.learned_opt.base_workdir, cfg.data.to_dict(), split], make)


def learned_opt_task(cfg) -> Task:
  o = cfg.learned_opt
  classifier, _ = load_base(o.base_workdir)
  graphdef, state = nnx.split(classifier)
  shapes = [tuple(x.shape) for x in jax.tree.leaves(nnx.state(classifier, target_filter(o)))]
  bad = [s for s in shapes if len(s) != 2]
  require(not bad and shapes, "learned_opt.matrices", f"targets must be matrices, got shapes {shapes}")
  seed = int(cfg.train.seed)
  rows = {}
  for split, count in (("train", int(o.episodes)), ("eval", int(o.eval_episodes))):
    points = base_points(cfg, split)[0]
    rows[split] = slag_data.episodes(points, count, int(o.sequential), int(o.num_other),
                                     seed=int(o.episode_seed) + (split == "eval"))
  data = slag_data.ArrayData(rows["train"], rows["eval"], batch_size=int(cfg.train.batch_size), seed=seed)

  def build():
    hyper = HyperNetwork(o, int(cfg.model.vocab_size), int(cfg.model.d_model), shapes, rngs=nnx.Rngs(params=seed))
    return LearnedOptimizer(nnx.merge(graphdef, state), hyper)

  seq_len, r = int(cfg.data.seq_len), int(o.sequential)
  rows_per_episode = r * (4 + rows["train"]["para"].shape[2] + rows["train"]["ent"].shape[2]) + int(o.num_other)
  print(f"slag learned optimizer: {len(shapes)} target matrices, {data.num_train_rows} train / "
        f"{data.num_eval_rows} eval episodes of {r} update(s)", flush=True)
  return Task(build_model=build, loss_fn=slag_loss_fn(o), data=data,
              train_flops_per_example=flops_for(cfg.model, seq_len).training * seq_len * rows_per_episode,
              units_per_example=seq_len * rows_per_episode, eval_summary=episode_summary,
              trainable=hyper_param_filter())


def make_task(cfg) -> Task:
  return base_task(cfg) if cfg.stage == "base" else learned_opt_task(cfg)


def main(argv) -> int:
  """The command line on `argv` (tests call it in-process); raises ConfigError on bad input."""
  return train_main(argv, make_task, validate, resolve)


if __name__ == "__main__":
  cli(make_task, validate, resolve)
