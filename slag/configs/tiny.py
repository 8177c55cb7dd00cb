"""Both stages of slag.train on the generated knowledge base, minutes on a 2-core CPU:
`--config=slag/configs/tiny.py:stage=base` (the classifier), then
`--config=slag/configs/tiny.py:stage=learned_opt,objective=slag --config.learned_opt.base_workdir=BASE_DIR`
(`objective=plain`: the main input and the KL term only, one update per episode, as KnowledgeEditor).
Real data: `--config.data.path=FILE.jsonl --config.data.format=fever|zsre|leapofthought`, a pretrained LM
with `--config.model.init_from=NAME`."""
import ml_collections

from common.config import config_args
from common.configs.base import base_config, dense_model
from slag.model import opt_config

STAGES = ("base", "learned_opt")
OBJECTIVES = ("slag", "plain")


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      format="generated",     # 'generated' | 'fever' | 'zsre' | 'leapofthought' (the last three need path)
      path="",                # an official jsonl file; '' = the generated knowledge base
      num_entities=24,        # generated: entities, each in one of 8 categories
      false_per_entity=3,     # generated: false memberships per entity (beliefs besides the true one)
      eval_fraction=0.25,     # generated: entities whose beliefs are only updated at evaluation
      kb_seed=0,              # the knowledge base (the same for every run of a study)
      tokenizer="byte",       # 'byte' | 'spm' (with tokenizer_path); a hub base brings its own
      tokenizer_path="",
      seq_len=48,             # tokens of a statement (a longer one keeps its end)
      cond_len=64,            # tokens of the hypernetwork's conditioning text
  ))


def objective(name: str) -> dict:
  """The SLAG terms: 'slag' turns on paraphrases, entailed statements and sequential training (r=3) with the
  retain term; 'plain' keeps the main input and the KL term, r=1."""
  if name == "plain":
    return dict(paraphrase_weight=0.0, entailed_weight=0.0, retain_weight=0.0, sequential=1)
  return dict(paraphrase_weight=1.0, entailed_weight=1.0, retain_weight=1.0, sequential=3)


def get_config(arg=None):
  a = config_args(arg, dict(stage="base", objective="slag"))
  if a["stage"] not in STAGES:
    raise ValueError(f"unknown stage '{a['stage']}' (valid: {', '.join(STAGES)})")
  if a["objective"] not in OBJECTIVES:
    raise ValueError(f"unknown objective '{a['objective']}' (valid: {', '.join(OBJECTIVES)})")
  c = base_config()
  c.stage = a["stage"]
  c.model = dense_model(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192)
  c.model.init_from = ""  # a hub checkpoint name; '' = random init
  c.data = data_config()
  c.learned_opt = opt_config(**objective(a["objective"]))
  c.learned_opt.update(base_workdir="", episodes=512, eval_episodes=32, episode_seed=0, num_other=6, kl_weight=5.0)
  # How slag.evaluate (and the study) updates beliefs; the baselines stop at success or max_steps.
  c.updates = ml_collections.ConfigDict(dict(sequential=6, chains=4, max_steps=50, sgd_lr=1e-2, adam_lr=1e-3,
                                             max_single=0))
  if c.stage == "base":
    c.train.update(steps=500, batch_size=32, learning_rate=3e-3, warmup_steps=20, weight_decay=0.0)
  else:
    c.train.update(steps=120, batch_size=8, learning_rate=1e-3, warmup_steps=10, weight_decay=0.0)
  c.eval.update(every_steps=100, batches=8)
  c.checkpoint.update(every_steps=100, keep=1)
  return c
