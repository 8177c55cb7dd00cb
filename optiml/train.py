"""`python -m optiml.train --config=optiml/configs/tiny.py[:stage=pretrain] --workdir=DIR [--config.KEY=VALUE ...]`

Two stages on the common trainer (Iyer et al. 2022):
  pretrain   the base: a dense LM trained from scratch on generic text (a slice of the embedded corpus and the
             unlabelled inputs of the training tasks, every token trained), what OPT is to OPT-IML;
  instruct   instruction meta-learning: the training tasks' mixture (optiml/data.py `training_examples`),
             loss on target tokens only, whole examples packed first-fit into rows whose segments never attend
             to each other (`common.data.sft.pack_examples`), from a base run (`init.run`, a pretrain workdir)
             or a hub entry (`model.init_from`, its tokenizer with it).
eval/loss is the answer loss on the held-out instances of seen tasks, 0-shot. `train.steps` is derived:
`data.epochs` passes over the packed rows.
"""
from __future__ import annotations

import json
import math
import os

import ml_collections
import numpy as np
from flax import nnx

from common.config import ConfigError, require
from common.data import corpus as corpus_lib
from common.data.sft import OVERLONG_POLICIES, SFTData, pack_examples, tokenize_example
from common.flops import flops_for
from common.models import build_model, padded_vocab_size, validate_model_config
from common.models import checkpoint_library as hub
from common.tasks.base import Task
from common.tasks.lm import next_token_loss
from common.tasks.sft import adopt_hub_base
from common.tokenizers import TOKENIZERS, Tokenizer, load_tokenizer
from common.train.__main__ import cli, main as train_main
from common.train.restore import load_run_model, read_run_config
from optiml import data as optiml_data

STAGES = ("pretrain", "instruct")


def check_data(d) -> None:
  """The checks of `data.*`, each naming its key, before any task is generated or read."""
  require(d.stage in STAGES, "data.stage", f"unknown stage '{d.stage}' (valid: {', '.join(STAGES)})")
  require(d.sampling in optiml_data.SAMPLINGS, "data.sampling",
          f"unknown sampling '{d.sampling}' (valid: {', '.join(optiml_data.SAMPLINGS)})")
  require(d.proportions in optiml_data.PROPORTIONS, "data.proportions",
          f"unknown proportions '{d.proportions}' (valid: {', '.join(optiml_data.PROPORTIONS)})")
  bad = [c for c in d.components if c not in optiml_data.COMPONENTS]
  require(not bad, "data.components", f"unknown component '{bad[0] if bad else ''}' "
          f"(valid: {', '.join(optiml_data.COMPONENTS)})")
  require(d.tokenizer in TOKENIZERS, "data.tokenizer", f"must be one of {TOKENIZERS}, got '{d.tokenizer}'")
  require(d.overlong in OVERLONG_POLICIES, "data.overlong", f"must be one of {OVERLONG_POLICIES}")
  require(float(d.temperature) > 0, "data.temperature", f"must be > 0, got {d.temperature}")
  require(float(d.epochs) > 0, "data.epochs", f"must be > 0, got {d.epochs}")
  require(0 <= float(d.train_demo_fraction) <= 1, "data.train_demo_fraction", "must be in [0, 1]")
  require(0 <= float(d.component_share) < 0.5, "data.component_share", "must be in [0, 0.5)")
  for key in ("train_examples", "eval_instances", "seq_len", "leakage_ngram"):
    require(int(d[key]) > 0, f"data.{key}", f"must be positive, got {d[key]}")
  for key in ("task_cap", "num_train_tasks", "heldout_tasks_per_category", "train_shots", "eval_shots",
              "corpus_bytes"):
    require(int(d[key]) >= 0, f"data.{key}", f"must be >= 0, got {d[key]}")


def load_tasks(d) -> list[optiml_data.TaskSpec]:
  """The suite: Super-NaturalInstructions files (`data.niv2_dir`) and jsonl tasks (`data.jsonl_paths`) when
  given (the optional components still generated), else the generated suite."""
  generated = optiml_data.generated_suite(int(d.suite_seed))
  if not d.niv2_dir and not d.jsonl_paths:
    return list(generated)
  tasks = optiml_data.read_niv2_dir(d.niv2_dir) if d.niv2_dir else []
  for path in d.jsonl_paths:
    if not os.path.isfile(os.path.expanduser(path)):
      raise ConfigError(f"config key 'data.jsonl_paths': {path}: no such file")
    tasks.append(optiml_data.read_prompt_jsonl(path))
  return tasks + [t for t in generated if t.category in optiml_data.COMPONENTS]


def split_for(d) -> optiml_data.Split:
  return optiml_data.split_suite(
      load_tasks(d), heldout_categories=tuple(d.heldout_categories),
      heldout_tasks_per_category=int(d.heldout_tasks_per_category), eval_instances=int(d.eval_instances),
      seed=int(d.suite_seed), num_train_tasks=int(d.num_train_tasks), leakage_ngram=int(d.leakage_ngram),
      leakage_threshold=float(d.leakage_threshold))


def tokenizer_for(cfg) -> Tokenizer:
  """A hub base's tokenizer when it stored one, else `data.tokenizer` (bytes by default)."""
  stored = hub.entry_tokenizer(cfg.model.init_from) if cfg.model.init_from else None
  return stored or load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)


def corpus_texts(max_bytes: int, chunk: int) -> list[str]:
  """The first `max_bytes` of the embedded corpus (the standard library's text), in chunks of `chunk` chars."""
  root, rels = corpus_lib.embedded_files()
  texts, total = [], 0
  for rel in rels:
    if total >= max_bytes:
      break
    text = corpus_lib.read_text(os.path.join(root, rel))[:max_bytes - total]
    total += len(text)
    texts += [text[i:i + chunk] for i in range(0, len(text), chunk) if text[i:i + chunk].strip()]
  return texts


def pretraining_examples(d, split: optiml_data.Split, tokenizer: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
  """Generic text for the base: corpus chunks and the unlabelled task inputs joined into lines, every token
  trained (plain language modelling)."""
  chunk = int(d.seq_len) // 2  # bytes or fewer tokens: always fits a row
  lines = optiml_data.pretraining_texts(split)
  rng = np.random.default_rng([int(d.suite_seed), 3])
  lines = [lines[i] for i in rng.permutation(len(lines))]
  blocks, current = [], ""
  for line in lines:
    if current and len(current) + len(line) + 1 > chunk:
      blocks.append(current)
      current = ""
    current = f"{current}\n{line}" if current else line
  texts = corpus_texts(int(d.corpus_bytes), chunk) + blocks + ([current] if current else [])
  out = []
  for text in texts:
    ids = np.asarray(tokenizer.encode(text, bos=tokenizer.bos_id is not None, eos=True), np.int32)
    out.append((ids, np.ones(len(ids), bool)))
  return out


def eval_examples(split: optiml_data.Split) -> list[dict[str, str]]:
  """The held-out instances of seen tasks, 0-shot: what eval/loss measures during training."""
  return [{"prompt": optiml_data.render_prompt(t, i), "response": " " + i.output}
          for t, items, _ in split.evals["heldout_instance"] for i in items]


def _pack(examples, d, what: str) -> dict[str, np.ndarray]:
  rows, _ = pack_examples(examples, int(d.seq_len), overlong=d.overlong)
  if not len(rows["targets"]):
    raise ConfigError(f"config key 'data.seq_len': no {what} example fits")
  return rows


def build_data(cfg, tokenizer: Tokenizer) -> tuple[SFTData, optiml_data.Split]:
  """The stage's packed rows (train) and the held-out-instance rows (eval)."""
  d = cfg.data
  split = split_for(d)
  if d.stage == "pretrain":
    train_examples = pretraining_examples(d, split, tokenizer)
  else:
    train_examples = [tokenize_example(e, tokenizer)
                      for e in optiml_data.training_examples(split, d, int(d.mixture_seed))]
  train_rows = _pack(train_examples, d, "training")
  eval_rows = _pack([tokenize_example(e, tokenizer) for e in eval_examples(split)], d, "evaluation")
  data = SFTData(train_rows, eval_rows, batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed))
  return data, split


_BUILT: dict[str, tuple] = {}


def data_for(cfg) -> tuple[SFTData, optiml_data.Split, Tokenizer]:
  """`build_data` once per process for each (data, base, batch, seed): `resolve` needs the row count and
  `make_task` the rows."""
  key = json.dumps([cfg.data.to_dict(), cfg.model.get("init_from", ""), int(cfg.train.batch_size),
                    int(cfg.train.seed)], sort_keys=True)
  if key not in _BUILT:
    tokenizer = tokenizer_for(cfg)
    _BUILT.clear()
    _BUILT[key] = (*build_data(cfg, tokenizer), tokenizer)
  return _BUILT[key]


def adopt_base_run(cfg) -> None:
  """`init.run` (a pretrain workdir) gives the model config: fine-tuning keeps the base's architecture."""
  if cfg.init.run:
    require(not cfg.model.init_from, "init.run", "give init.run or model.init_from, not both")
    base = read_run_config(cfg.init.run, "init.run")
    cfg.model = ml_collections.ConfigDict({**base.model.to_dict(), "init_from": ""})


def resolve(cfg):
  """Fills what the config derives (in place; returns it): the base's model config (a run's or a hub
  entry's); model.vocab_size 0 as the tokenizer's ids padded to a multiple of 128; train.steps from
  data.epochs over the packed rows."""
  check_data(cfg.data)
  adopt_hub_base(cfg)
  adopt_base_run(cfg)
  data, _, tokenizer = data_for(cfg)
  if int(cfg.model.vocab_size) == 0:
    cfg.model.vocab_size = padded_vocab_size(tokenizer.vocab_size)
  cfg.train.steps = max(1, math.ceil(data.num_train_rows * float(cfg.data.epochs) / int(cfg.train.batch_size)))
  return cfg


def validate(cfg) -> None:
  check_data(cfg.data)
  validate_model_config(cfg.model)


def base_builder(cfg):
  """A function that builds the run's starting model: the base run's newest parameters, a hub entry's, or a
  random dense LM."""
  seed = int(cfg.train.seed)
  if cfg.init.run:
    base_cfg = read_run_config(cfg.init.run, "init.run")
    model = load_run_model(cfg.init.run, base_cfg, lambda: build_model(base_cfg.model, seed=0), key="init.run")[0]
    parts = nnx.split(model)
    return lambda: nnx.merge(*parts)
  if cfg.model.init_from:
    parts = nnx.split(hub.load(cfg.model.init_from)[1])
    return lambda: nnx.merge(*parts)
  return lambda: build_model(cfg.model, seed=seed)


def make_task(cfg) -> Task:
  """The Task of a resolved config: next-token loss weighted by the loss mask (targets only in `instruct`)."""
  data, split, tokenizer = data_for(cfg)
  require(cfg.model.vocab_size >= tokenizer.vocab_size, "model.vocab_size",
          f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
  print(f"optiml data: stage {cfg.data.stage}, {len(split.train)} training tasks, {data.num_train_rows} rows "
        f"x {cfg.data.epochs} epochs; eval tasks per level " +
        ", ".join(f"{k} {len(v)}" for k, v in split.evals.items()) + f"; {split.dropped} leaked instances dropped",
        flush=True)
  seq_len = data.seq_len
  return Task(build_model=base_builder(cfg), loss_fn=next_token_loss, data=data,
              train_flops_per_example=flops_for(cfg.model, seq_len).training * seq_len, units_per_example=seq_len)


def main(argv) -> int:
  """The command line on `argv` (tests call it in-process); raises ConfigError on bad input."""
  return train_main(argv, make_task, validate, resolve)


if __name__ == "__main__":
  cli(make_task, validate, resolve)
