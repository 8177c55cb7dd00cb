"""The model of the miniature study (`python -m mot.reproduce`): the tiny config's documents and schedule with a
wider, deeper transformer, trained long enough for the curves to separate. Same arguments as tiny.py
(`setting`, `modalities`, `model`); every pair of a comparison shares all shapes, hence FLOPs per token.
"""
from __future__ import annotations

from mot.configs import tiny


def get_config(arg=None):
  a = tiny.parse_args(arg)
  c = tiny.get_config(arg)
  c.model.update(d_model=96, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256)
  tiny.apply_args(c, a)
  c.data.update(n_train_docs=4000, n_eval_docs=400)
  c.train.update(steps=600, batch_size=8, warmup_steps=40, learning_rate=3e-3)
  c.eval.update(every_steps=60, batches=8, sample_images=0)
  c.checkpoint.update(every_steps=60, keep=1)
  return c
