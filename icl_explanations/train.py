"""`python -m icl_explanations.train --config=icl_explanations/configs/tiny.py --workdir=DIR [--config.KEY=VALUE ...]`

Meta-trains a small dense LM for in-context learning with explanations (the controlled stand-in for the
pretrained code-davinci-002 of Ye et al. 2023): every training sequence is a fresh episode of one task family
(icl_explanations/data.py: a latent rule, `data.shots` exemplars with their explanations, one query), the loss
on the query's explanation, answer and end of sequence, so the model has to read the rule off the
exemplars (`data.loss_on=all_answers`, the default, also trains every exemplar's explanation and answer).
Training episodes use train problem identities only; eval/loss is the same loss on test episodes.
"""
from __future__ import annotations

import json

import numpy as np

from common.config import ConfigError, require
from common.data.sft import SFTData
from common.flops import flops_for
from common.models import build_model, padded_vocab_size, validate_model_config
from common.tasks.base import Task
from common.tasks.lm import next_token_loss
from common.tokenizers import Tokenizer, load_tokenizer
from common.train.__main__ import cli, main as train_main
from icl_explanations import data as icl_data

TOKENIZERS = ("byte", "spm")


def families(data_cfg) -> list[str]:
  names = [f.strip() for f in str(data_cfg.families).split(",") if f.strip()]
  bad = [f for f in names if f not in icl_data.FAMILIES]
  require(names and not bad, "data.families",
          f"unknown family '{bad[0] if bad else ''}' (valid: {', '.join(icl_data.FAMILIES)})")
  return names


def tokenizer_for(data_cfg) -> Tokenizer:
  return load_tokenizer(data_cfg.tokenizer, data_cfg.tokenizer_path)


LOSS_ON = ("all_answers", "query")


def encode(exemplars, query, tokenizer: Tokenizer, loss_on: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids, trained) of a k-shot prompt and the query's answer (data.prompt's text, piece by piece): the query's
  explanation, answer and EOS are trained, and with `all_answers` every exemplar's explanation and answer too
  (k + 1 targets a sequence rather than one; an early exemplar cannot know the episode's rule, a later one can
  read it off those before it)."""
  ids: list[int] = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  trained: list[bool] = [False] * len(ids)

  def add(text: str, train: bool, eos: bool = False) -> None:
    piece = tokenizer.encode(text, eos=eos)
    ids.extend(piece)
    trained.extend([train] * len(piece))

  for ex in exemplars:
    add(f"Q: {ex.question}\nA:", False)
    add(" " + icl_data.answer_text(ex), loss_on == "all_answers")
    add("\n\n", False)
  add(f"Q: {query.question}\nA:", False)
  add(" " + icl_data.answer_text(query), True, eos=True)
  return np.asarray(ids, np.int32), np.asarray(trained)


def one_per_row(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
  """The rows of `common.data.sft` (inputs, targets, loss_mask, segment_ids, positions), one example a row:
  meta-training prompts nearly fill a row, so packing would only cost time."""
  rows = {k: np.zeros((len(examples), seq_len), np.float32 if k == "loss_mask" else np.int32)
          for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  for r, (ids, trained) in enumerate(examples):
    n = len(ids) - 1
    if n > seq_len:
      raise ConfigError(f"config key 'data.seq_len': a meta-training sequence has {n} positions, more than {seq_len}")
    rows["inputs"][r, :n], rows["targets"][r, :n], rows["loss_mask"][r, :n] = ids[:-1], ids[1:], trained[1:]
    rows["segment_ids"][r, :n], rows["positions"][r, :n] = 1, np.arange(n)
  return rows


def episodes_to_examples(data_cfg, split: str, count: int, seed: int, tokenizer: Tokenizer) -> list:
  """`count` k-shot sequences, one fresh episode each, families in turn."""
  names = families(data_cfg)
  rng = np.random.default_rng((int(data_cfg.example_seed), seed, split == "test"))
  out = []
  for i in range(count):
    episode = icl_data.make_episode(names[i % len(names)], rng, split=split, pool_size=int(data_cfg.shots), queries=1)
    out.append(encode(episode.pool, episode.queries[0], tokenizer, data_cfg.loss_on))
  return out


_BUILT: dict[str, tuple[SFTData, Tokenizer]] = {}


def data_for(cfg) -> tuple[SFTData, Tokenizer]:
  """The meta-training rows of a config, built once per process for each (data, batch, seed)."""
  key = json.dumps([cfg.data.to_dict(), int(cfg.train.batch_size), int(cfg.train.seed)], sort_keys=True)
  if key not in _BUILT:
    tokenizer = tokenizer_for(cfg.data)
    d, seq_len = cfg.data, int(cfg.data.seq_len)
    train_rows = one_per_row(episodes_to_examples(d, "train", int(d.train_examples), 0, tokenizer), seq_len)
    eval_rows = one_per_row(episodes_to_examples(d, "test", int(d.eval_examples), 0, tokenizer), seq_len)
    _BUILT.clear()
    _BUILT[key] = (SFTData(train_rows, eval_rows, batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed)),
                   tokenizer)
  return _BUILT[key]


def check_data(d) -> None:
  families(d)
  require(d.loss_on in LOSS_ON, "data.loss_on", f"must be one of {LOSS_ON}, got '{d.loss_on}'")
  require(d.tokenizer in TOKENIZERS, "data.tokenizer", f"must be one of {TOKENIZERS}, got '{d.tokenizer}'")
  for key in ("shots", "train_examples", "eval_examples", "seq_len"):
    require(int(d[key]) > 0, f"data.{key}", f"must be positive, got {d[key]}")


def resolve(cfg):
  """Fills model.vocab_size 0 as the tokenizer's ids padded to a multiple of 128 (in place; returns cfg)."""
  check_data(cfg.data)
  if int(cfg.model.vocab_size) == 0:
    cfg.model.vocab_size = padded_vocab_size(tokenizer_for(cfg.data).vocab_size)
  return cfg


def validate(cfg) -> None:
  check_data(cfg.data)
  validate_model_config(cfg.model)


def make_task(cfg) -> Task:
  data, tokenizer = data_for(cfg)
  require(cfg.model.vocab_size >= tokenizer.vocab_size, "model.vocab_size",
          f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
  print(f"icl_explanations data: {data.num_train_rows} train and {data.num_eval_rows} eval sequences of "
        f"{data.seq_len} positions", flush=True)
  seed, seq_len = int(cfg.train.seed), data.seq_len
  return Task(build_model=lambda: build_model(cfg.model, seed=seed), loss_fn=next_token_loss, data=data,
              train_flops_per_example=flops_for(cfg.model, seq_len).training * seq_len, units_per_example=seq_len)


def main(argv) -> int:
  """The command line on `argv` (tests call it in-process); raises ConfigError on bad input."""
  return train_main(argv, make_task, validate, resolve)


if __name__ == "__main__":
  cli(make_task, validate, resolve)
