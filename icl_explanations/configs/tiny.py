"""A small dense LM meta-trained from scratch on k-shot prompts with explanations over the generated task
families (icl_explanations/data.py), byte tokens; minutes on a 2-core CPU. `get_config("families=arith")`
trains on one family."""
import ml_collections

from common.config import config_args
from common.configs.base import base_config, dense_model
from icl_explanations.data import FAMILIES

# Positions a 4-shot byte-level meta-training sequence of each family needs (the longest seen, rounded up).
SEQ_LEN = {"arith": 416, "letter": 480, "coin": 640}


def get_config(arg=None):
  a = config_args(arg, dict(families=",".join(FAMILIES)))
  bad = [f for f in a["families"].split(",") if f not in FAMILIES]
  if bad:
    raise ValueError(f"unknown family '{bad[0]}' (valid: {', '.join(FAMILIES)})")
  c = base_config()
  c.model = dense_model(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384)
  c.data = ml_collections.ConfigDict(dict(
      families=a["families"],   # comma list of data.FAMILIES, in turn
      shots=4,                  # exemplars per meta-training prompt
      loss_on="all_answers",    # 'all_answers' (every exemplar's and the query's) or 'query' (the query's only)
      train_examples=32000,     # meta-training sequences, one fresh episode each
      eval_examples=256,        # test-episode sequences for eval/loss
      example_seed=0,
      tokenizer="byte",
      tokenizer_path="",
      seq_len=max(SEQ_LEN[f] for f in a["families"].split(",")),
  ))
  c.train.update(steps=2000, batch_size=16, learning_rate=3e-3, warmup_steps=100, weight_decay=0.0)
  c.eval.update(every_steps=500, batches=4)
  c.checkpoint.update(every_steps=500, keep=1)
  return c
