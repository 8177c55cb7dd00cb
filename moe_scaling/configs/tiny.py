"""A tiny dense or MoE LM on the embedded byte corpus, a few minutes on a 2-core CPU.

`--config=moe_scaling/configs/tiny.py:family=moe,d_model=64,experts=8` (defaults: family=moe, d_model=64,
experts=8, mode=capacity)."""
from common.configs.base import base_config
from moe_scaling.model import model_config


def _args(arg) -> dict:
  out = dict(family="moe", d_model="64", experts="8", mode="capacity")
  for pair in filter(None, (arg or "").split(",")):
    key, _, value = pair.partition("=")
    if key not in out:
      raise ValueError(f"unknown config argument '{key}' (known: {', '.join(out)})")
    out[key] = value
  return out


def get_config(arg=None):
  a = _args(arg)
  c = base_config()
  c.model = model_config(a["family"], int(a["d_model"]), num_experts=int(a["experts"]), mode=a["mode"])
  c.train.steps = 200
  c.train.batch_size = 8
  c.train.warmup_steps = 20
  c.data.seq_len = 128
  c.data.max_train_bytes = 4_000_000
  c.data.max_eval_bytes = 400_000
  c.eval.every_steps = 100
  c.eval.batches = 8
  c.checkpoint.every_steps = 100
  return c
