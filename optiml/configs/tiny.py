"""A small dense LM and the generated suite, minutes on a 2-core CPU: `--config=optiml/configs/tiny.py:stage=pretrain`
trains the base; the default stage `instruct` fine-tunes it on the training tasks' mixture
(`--config.init.run=BASE_WORKDIR`; without it, from a random model). Real data: `--config.data.niv2_dir=.../tasks`
and/or `--config.data.jsonl_paths=a.jsonl,b.jsonl` with a pretrained base, `--config.model.init_from=NAME`."""
import ml_collections

from common.config import config_args
from common.configs.base import base_config, dense_model
from common.data import DEFAULT_CACHE_DIR
from optiml.data import COMPONENTS

STAGES = ("pretrain", "instruct")


def data_config(stage: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      stage=stage,                    # 'pretrain' (the base) | 'instruct' (instruction meta-learning)
      niv2_dir="",                    # a Super-NaturalInstructions tasks/ folder; '' = the generated suite
      jsonl_paths=[],                 # PromptSource/FLAN-style jsonl tasks ({inputs, targets} or {prompt, completion})
      suite_seed=0,                   # the generated suite and the stable shuffles of the splits
      heldout_categories=["comparison", "logic", "set_ops"],  # level 1: fully held-out categories
      heldout_tasks_per_category=1,   # level 2: held-out tasks of each seen category
      eval_instances=16,              # level 3 (and the size of every evaluation task): held-out instances
      num_train_tasks=0,              # > 0: keep this many training tasks (the task-count ablation)
      leakage_ngram=6,                # the leakage filter: word n-grams of input + output
      leakage_threshold=0.5,          # drop an evaluation instance with this share of its n-grams in training
      sampling="proportional",        # within benchmarks: proportional | temperature | uniform
      task_cap=64,                    # examples-proportional cap per task (0: none)
      temperature=2.0,
      proportions="examples",         # over benchmarks: examples | paper (approximate) | uniform
      component_share=0.03,           # each optional component's share (outside 'paper')
      components=list(COMPONENTS),    # optional components: reasoning (chain of thought), dialogue
      train_examples=4000,            # the instruction stream's length
      train_demo_fraction=0.5,        # share of training examples with demonstrations
      train_shots=2,                  # demonstrations per such example: 1..train_shots
      eval_shots=2,                   # k of the k-shot evaluation
      mixture_seed=0,                 # the stream's draw (the same for every seed of a study)
      corpus_bytes=200_000,           # pretrain: bytes of the embedded corpus beside the unlabelled task inputs
      epochs=1.0,                     # passes over the stage's packed rows: train.steps is derived
      tokenizer="byte",
      tokenizer_path="",
      seq_len=448,
      overlong="error",
      cache_dir=DEFAULT_CACHE_DIR,
  ))


def get_config(arg=None):
  a = config_args(arg, dict(stage="instruct"))
  if a["stage"] not in STAGES:
    raise ValueError(f"unknown stage '{a['stage']}' (valid: {', '.join(STAGES)})")
  c = base_config()
  c.model = dense_model(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384)
  c.model.init_from = ""  # a hub checkpoint name; '' = random init (or init.run)
  c.init = ml_collections.ConfigDict(dict(run=""))  # a pretrain workdir to fine-tune from
  c.data = data_config(a["stage"])
  # The paper's recipe (sec. 4.1): Adam with b1 0.9, b2 0.95, eps 1e-8, warmup, linear decay to zero,
  # clipping at 1.0.
  c.train.update(steps=1, batch_size=16, learning_rate=3e-3, schedule="linear", min_learning_rate_ratio=0.0,
                 warmup_steps=20, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0)
  c.eval.update(every_steps=100, batches=4)
  c.checkpoint.update(every_steps=100, keep=1)
  return c
