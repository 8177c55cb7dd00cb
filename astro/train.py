"""`python -m astro.train --config=astro/configs/tiny.py:stage=base|sft_direct|sft_astro|rl --workdir=DIR`

The training stages of Kim et al. (2025) on the common trainer:
  base        the imperfect base policy (the miniature's stand-in for an instruct model): SFT from random
              weights on sampled step-by-step solutions of the training problems, a share of their steps
              wrong (`data.error_rate`);
  sft_direct  SFT from `init_run` on the direct traces (best path only) of the search in `data.search_dir`;
  sft_astro   SFT from `init_run` on the linearised search traces (dead ends, reflections, backtracks);
  rl          GRPO from `init_run` (an SFT run) with a verifiable reward (+1 right final answer, -1 otherwise):
              `rl.group_size` samples per training problem, `rl.prompts_per_step` problems per step
              (common/tasks/grpo.py), the KL to the starting policy.
SFT stages train on response tokens only; their eval/loss is the loss of the gold solutions of the test
problems. `python -m astro.search` makes the search; `python -m astro.reproduce` runs every stage in order.
"""
from __future__ import annotations

import numpy as np

from common.config import require
from common.data.sft import OVERLONG_POLICIES, SFTData, pack_examples, tokenize_example
from common.flops import flops_for
from common.models import validate_model_config
from common.tasks import grpo
from common.tasks.base import Task
from common.tasks.lm import next_token_loss
from common.tokenizers import TOKENIZERS, Tokenizer
from common.train.__main__ import cli, main as train_main

from astro import data as astro_data
from astro import linearize
from astro import model as astro_model
from astro.search import read_trees

STAGES = ("base", "sft_direct", "sft_astro", "rl")
TRACES = {"sft_direct": "direct", "sft_astro": "astro"}
EVAL_PROBLEMS = 64  # test problems whose gold solutions make the SFT stages' eval rows


def check_data(cfg) -> None:
  """The checks of `stage`, `init_run` and `data.*`, each naming its key, before any data is read."""
  d = cfg.data
  require(cfg.stage in STAGES, "stage", f"unknown stage '{cfg.stage}' (valid: {', '.join(STAGES)})")
  require(d.tokenizer in TOKENIZERS, "data.tokenizer", f"must be one of {TOKENIZERS}, got '{d.tokenizer}'")
  require(d.overlong in OVERLONG_POLICIES, "data.overlong", f"must be one of {OVERLONG_POLICIES}")
  require(int(d.seq_len) > 1, "data.seq_len", f"must be > 1, got {d.seq_len}")
  require(1 <= int(d.min_steps) <= int(d.max_steps), "data.max_steps",
          f"need 1 <= data.min_steps <= data.max_steps, got {d.min_steps}, {d.max_steps}")
  require(0 <= float(d.error_rate) <= 1, "data.error_rate", f"must be in [0, 1], got {d.error_rate}")
  for key in ("num_train_problems", "num_test_problems", "base_solutions"):
    require(int(d[key]) >= 1, f"data.{key}", f"must be >= 1, got {d[key]}")
  if cfg.stage == "base":
    require(not d.path, "data.path", "the base stage trains on generated problems; start a real-data run from "
            "a pretrained model (model.init_from) at stage sft_* or rl")
  elif not cfg.model.init_from:
    require(bool(cfg.init_run), "init_run", f"stage '{cfg.stage}' starts from an earlier stage's workdir")
  if cfg.stage in TRACES:
    require(bool(d.search_dir), "data.search_dir", f"stage '{cfg.stage}' trains on a search's traces")


def check_rl(cfg) -> None:
  r = cfg.rl
  require(int(r.group_size) >= 2, "rl.group_size", f"must be >= 2, got {r.group_size}")
  require(int(r.prompts_per_step) >= 1, "rl.prompts_per_step", f"must be >= 1, got {r.prompts_per_step}")
  require(r.kl_method in grpo.KL_METHODS, "rl.kl_method", f"must be one of {grpo.KL_METHODS}, got '{r.kl_method}'")
  require(int(r.max_new_tokens) < int(cfg.data.seq_len), "rl.max_new_tokens",
          f"must leave room for the prompt in data.seq_len={cfg.data.seq_len}, got {r.max_new_tokens}")
  require(float(r.temperature) > 0, "rl.temperature", f"must be > 0, got {r.temperature}")


def resolve(cfg):
  """Fills what the config derives (in place; returns it): the starting point's model config (`init_run` or
  the hub entry), model.vocab_size 0 as the tokenizer's ids padded to a multiple of 128, and for rl the
  batch (prompts x group)."""
  check_data(cfg)
  if cfg.stage == "rl":
    check_rl(cfg)
  astro_data.problem_sets(cfg.data)  # a bad problem file fails here, before the workdir is made
  astro_model.adopt_base(cfg)
  if cfg.stage == "rl":
    cfg.train.batch_size = int(cfg.rl.prompts_per_step) * int(cfg.rl.group_size)
  return cfg


def validate(cfg) -> None:
  check_data(cfg)
  if cfg.stage == "rl":
    check_rl(cfg)
  validate_model_config(cfg.model)


def sft_examples(cfg) -> list[dict]:
  """The stage's {prompt, response} examples: noisy sampled solutions (base) or a search's traces."""
  if cfg.stage == "base":
    train, _ = astro_data.problem_sets(cfg.data)
    rng = np.random.default_rng((int(cfg.data.problem_seed), 7))
    return [dict(prompt=astro_data.prompt_of(p), response=astro_data.solution_text(
        astro_data.noisy_solution(p, rng, float(cfg.data.error_rate))))
        for _ in range(int(cfg.data.base_solutions)) for p in train]
  examples = linearize.sft_examples(read_trees(cfg.data.search_dir), cfg.linearize, TRACES[cfg.stage])
  require(bool(examples), "data.search_dir", f"no tree in '{cfg.data.search_dir}' reached a verified answer")
  return examples


def _rows(examples: list[dict], tokenizer: Tokenizer, data_cfg) -> dict[str, np.ndarray]:
  return pack_examples((tokenize_example(e, tokenizer) for e in examples), int(data_cfg.seq_len),
                       overlong=data_cfg.overlong)[0]


def eval_rows(cfg, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  """Gold step-by-step solutions of the first test problems (generated data; real data: its own solutions
  are not in the step format, so no eval rows)."""
  _, test = astro_data.problem_sets(cfg.data)
  examples = [dict(prompt=astro_data.prompt_of(p), response=astro_data.solution_text(p.steps))
              for p in test[:EVAL_PROBLEMS] if p.steps]
  return _rows(examples, tokenizer, cfg.data) if examples else \
      {k: np.zeros((0, int(cfg.data.seq_len)), np.int32) for k in ("inputs", "targets", "segment_ids", "positions",
                                                                    "loss_mask")}


def rl_task(cfg, tokenizer: Tokenizer, build) -> Task:
  train, _ = astro_data.problem_sets(cfg.data)
  r = cfg.rl
  settings = grpo.GRPOSettings(group_size=int(r.group_size), epsilon=float(r.epsilon),
                               epsilon_high=float(r.epsilon_high), beta=float(r.beta), kl_method=r.kl_method,
                               temperature=float(r.temperature), max_new_tokens=int(r.max_new_tokens))
  bos = tokenizer.bos_id is not None
  encoded = [tokenizer.encode(astro_data.prompt_of(p), bos=bos) for p in train]
  seed, per_step = int(cfg.train.seed), min(int(r.prompts_per_step), len(train))

  def prompts_at(step: int):
    picks = np.random.default_rng((seed, step, 0x524C)).choice(len(train), per_step, replace=False)
    return [(encoded[i], train[i]) for i in picks]

  reward = lambda problem, text: 1.0 if astro_data.verify(problem, text) else -1.0
  rollout = grpo.grpo_rollout(prompts_at=prompts_at, reward=reward, reference=build(), tokenizer=tokenizer,
                              settings=settings, seq_len=int(cfg.data.seq_len))
  seq_len = int(cfg.data.seq_len)
  _, test = astro_data.problem_sets(cfg.data)
  gold = [p for p in test[:EVAL_PROBLEMS] if p.steps]
  evals = grpo.ReferenceEval([tokenizer.encode(astro_data.prompt_of(p), bos=bos) for p in gold],
                             [tokenizer.encode(astro_data.solution_text(p.steps), eos=True) for p in gold],
                             build(), seq_len=seq_len, batch_size=int(cfg.train.batch_size)) if gold else None
  return Task(build_model=build, loss_fn=lambda model, batch: grpo.grpo_loss(model, batch, settings), data=evals,
              train_flops_per_example=flops_for(cfg.model, seq_len).training * seq_len,
              units_per_example=seq_len, rollout=rollout, eval_summary=grpo.nll_summary)


def make_task(cfg) -> Task:
  """The Task of a resolved config (`resolve`)."""
  tokenizer = astro_model.tokenizer_for(cfg)
  astro_model.check_fits(cfg, tokenizer)
  build = astro_model.model_builder(cfg)
  if cfg.stage == "rl":
    return rl_task(cfg, tokenizer, build)
  examples = sft_examples(cfg)
  data = SFTData(_rows(examples, tokenizer, cfg.data), eval_rows(cfg, tokenizer),
                 batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed))
  print(f"astro data: stage {cfg.stage}, {len(examples)} examples in {data.num_train_rows} rows", flush=True)
  seq_len = data.seq_len
  return Task(build_model=build, loss_fn=next_token_loss, data=data,
              train_flops_per_example=flops_for(cfg.model, seq_len).training * seq_len, units_per_example=seq_len)


def main(argv) -> int:
  """The command line on `argv` (tests call it in-process); raises ConfigError on bad input."""
  return train_main(argv, make_task, validate, resolve)


if __name__ == "__main__":
  cli(make_task, validate, resolve)
