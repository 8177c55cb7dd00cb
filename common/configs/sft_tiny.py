"""Supervised fine-tuning of a small dense LM on the generated instruction examples (addition, reversal, copy,
sort), loss on responses only; `:rank=8` (or `--config.lora.rank=8`) trains LoRA adapters instead of all weights.
Set `--config.model.init_from=NAME` to start from a hub checkpoint (its architecture and tokenizer are used)."""
import ml_collections

from common.config import config_args
from common.configs.base import base_config, dense_model
from common.data.sft import default_sft_data_config


def get_config(arg=None):
  args = config_args(arg, {"rank": "0"})
  c = base_config()
  c.model = dense_model(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384)
  c.model.init_from = ""  # a hub checkpoint name; '' = random init
  c.lora = ml_collections.ConfigDict(dict(rank=int(args["rank"]), alpha=16.0,
                                         targets=("q", "k", "v", "o", "gate", "up", "down")))
  c.data = default_sft_data_config()
  c.train.update(steps=200, batch_size=8, learning_rate=1e-3, warmup_steps=20, weight_decay=0.0)
  c.eval.update(every_steps=100, batches=4)
  c.checkpoint.every_steps = 100
  return c
