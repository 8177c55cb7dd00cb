"""ASTRO in miniature, minutes on a 2-core CPU: a small byte-level dense LM on generated multi-step arithmetic
word problems (astro/data.py). `--config=astro/configs/tiny.py:stage=base|sft_direct|sft_astro|rl`; the stages
after base start from `--config.init_run=WORKDIR` (sft_*: the base run and `--config.data.search_dir=DIR` of
`python -m astro.search`; rl: an SFT run). Real data: `--config.model.init_from=NAME` (a hub entry, its
tokenizer) and `--config.data.path=MATH500.jsonl` at stage sft_* or rl."""
import ml_collections

from common.config import config_args
from common.configs.base import base_config, dense_model
from common.data import DEFAULT_CACHE_DIR

STAGES = ("base", "sft_direct", "sft_astro", "rl")
# Per stage: steps, learning rate, batch (rl: the batch is rl.prompts_per_step x rl.group_size).
SCHEDULES = {"base": (600, 1e-3, 16), "sft_direct": (40, 3e-4, 8), "sft_astro": (40, 3e-4, 8),
             "rl": (16, 1e-4, 0)}


def get_config(arg=None):
  a = config_args(arg, dict(stage="base"))
  if a["stage"] not in STAGES:
    raise ValueError(f"unknown stage '{a['stage']}' (valid: {', '.join(STAGES)})")
  c = base_config()
  c.stage = a["stage"]
  c.init_run = ""  # the workdir of the stage this one starts from ('' = model.init_from or random weights)
  c.model = dense_model(d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=384)
  c.model.init_from = ""  # a hub checkpoint name
  c.data = ml_collections.ConfigDict(dict(
      path="",                # MATH-500 / AIME / AMC / GSM8K jsonl of training problems; '' = generated
      test_path="",           # held-out problems ('' = data.path's)
      layout="",              # common.eval.math_data layout ('' = detected)
      num_train_problems=1024,
      num_test_problems=192,
      min_steps=2,            # difficulty: operations per generated problem
      max_steps=4,
      max_distractors=1,      # irrelevant sentences per problem, 0..this
      problem_seed=0,
      error_rate=0.12,        # share of wrong steps in the base policy's demonstrations
      base_solutions=2,       # sampled solutions per training problem (base stage)
      search_dir="",          # a search's folder (python -m astro.search): the sft stages' traces
      tokenizer="byte",
      tokenizer_path="",
      seq_len=256 if a["stage"] == "base" else 448,  # room for a search trace (or a 256-token rollout)
      overlong="truncate",
      cache_dir=DEFAULT_CACHE_DIR,
  ))
  c.search = ml_collections.ConfigDict(dict(
      k=3,                    # next steps sampled per expansion
      rollouts=1,             # completions valuing each new node (M)
      iterations=10,
      max_depth=8,
      c_puct=1.0,
      temperature=1.0,
      max_step_tokens=24,
      max_rollout_tokens=96,
      num_problems=96,        # the first training problems are searched
      batch_problems=48,      # trees searched together (one batched generation per iteration)
  ))
  c.linearize = ml_collections.ConfigDict(dict(
      seed=0,
      max_backtracks=2,       # dead ends written out per trace
      reflect_phrases=("Wait, let me check this.", "Let me double-check that.", "Hmm, let me verify this."),
      backtrack_phrases=("That is wrong. Let me go back to: {step}", "This does not work. Back to: {step}"),
      restart_phrases=("That is wrong. Let me start over.", "This does not work. Starting over."),
      verify_phrases=("This answer checks out.", "Checking the answer again: it is right."),
  ))
  c.rl = ml_collections.ConfigDict(dict(
      group_size=4, prompts_per_step=6, epsilon=0.2, epsilon_high=0.2, beta=0.04, kl_method="low_var_kl",
      temperature=1.0, max_new_tokens=256,  # also the evaluation's budget: a search trace is long
  ))
  steps, lr, batch = SCHEDULES[c.stage]
  c.train.update(steps=steps, learning_rate=lr, warmup_steps=max(1, steps // 20), weight_decay=0.0,
                 min_learning_rate_ratio=0.1)
  if batch:
    c.train.batch_size = batch
  c.eval.update(every_steps=max(1, steps // 4), batches=4)
  c.checkpoint.update(every_steps=max(1, steps // 2), keep=1)
  return c
