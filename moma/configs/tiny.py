"""`moma/configs/tiny.py[:variant=dense|moe|moma|moma_mod]`: a few-minute MoMa run on a laptop CPU.

The embedded mixed-modal data in the Chameleon setting (captions and VQ image tokens of generated scenes, one
sequence), a 4-layer model of width 64, and one of the four architectures of Lin et al. 2024 (table 2) at equal
FLOPs per token (moma/configs/base.py): the dense baseline, a mixed-modal expert-choice MoE, MoMa (modality
groups of experts) and MoMa with mixture-of-depths.
"""
from common.config import config_args
from common.configs.base import base_config
from common.data.mixed_modal import mixed_modal_data_config
from moma.configs.base import moma_model

SHAPE = dict(d_model=64, n_layers=4, n_heads=2, n_kv_heads=2, d_ff=256)


def get_config(arg=None):
  args = config_args(arg, dict(variant="moma"))
  c = base_config()
  c.data = mixed_modal_data_config()
  c.data.update(setting="chameleon", modalities=("text", "image"), seq_len=256)
  c.model = moma_model(args["variant"], **SHAPE)
  c.train.update(steps=200, batch_size=8, warmup_steps=20)
  c.eval.update(every_steps=100, batches=4)
  c.checkpoint.every_steps = 100
  return c
