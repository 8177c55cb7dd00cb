"""`moma/configs/reproduce.py[:variant=...,scale=default|quick]`: the runs of `python -m moma.reproduce`.

Every variant has the same shape and data; only the FFNs differ (moma/configs/base.py keeps the FLOPs per
token of dense, MoE and MoMa equal). `scale=quick` is a smoke-test size; reproduce sets steps, seed and the
eval/checkpoint schedule.
"""
from common.config import config_args
from common.configs.base import base_config
from common.data.mixed_modal import mixed_modal_data_config
from moma.configs.base import moma_model

SHAPES = dict(
    default=dict(d_model=64, n_layers=4, n_heads=2, n_kv_heads=2, d_ff=256),
    quick=dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64),
)
BATCH = dict(default=8, quick=8)
DOCS = dict(default=dict(n_train_docs=16000, n_eval_docs=400), quick=dict(n_train_docs=200, n_eval_docs=40))


def get_config(arg=None):
  args = config_args(arg, dict(variant="moma", scale="default"))
  scale = args["scale"]
  if scale not in SHAPES:
    raise ValueError(f"scale must be one of {', '.join(SHAPES)}, got '{scale}'")
  c = base_config()
  c.data = mixed_modal_data_config()
  c.data.update(setting="chameleon", modalities=("text", "image"), seq_len=256)
  c.model = moma_model(args["variant"], **SHAPES[scale])
  c.train.update(batch_size=BATCH[scale], learning_rate=3e-3, warmup_steps=50)
  c.eval.batches = 8 if scale == "default" else 2
  # default: 2000 steps x 8 rows see each of the ~8,600 training rows about twice; quick: a smoke run.
  c.data.update(DOCS[scale])
  return c
