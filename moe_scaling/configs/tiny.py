"""A tiny dense or MoE LM on the embedded byte corpus, a few minutes on a 2-core CPU.

`--config=moe_scaling/configs/tiny.py:family=moe,d_model=64,experts=8` (defaults: family=moe, d_model=64,
experts=8, mode=capacity, pairing=flops: experts of d_ff / 2, so a pair has equal FLOPs per token up to the
router; pairing=shape: experts as wide as the dense FFN, see moe_scaling/model.py)."""
from common.config import config_args
from common.configs.base import base_config, tiny_run
from moe_scaling.model import model_config


def get_config(arg=None):
  a = config_args(arg, dict(family="moe", d_model="64", experts="8", mode="capacity", pairing="flops"))
  c = base_config()
  c.model = model_config(a["family"], int(a["d_model"]), num_experts=int(a["experts"]), mode=a["mode"],
                         pairing=a["pairing"])
  return tiny_run(c, seq_len=128)
