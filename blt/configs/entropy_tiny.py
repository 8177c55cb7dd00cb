"""BLT's entropy model in miniature (Pagnoni et al. 2024, Sec. 2.3): the common dense LM on bytes with a
sliding attention window. The paper's has ~100M parameters and a window of 512 bytes; this one has 0.12 M
(d_model 64, 2 layers, window 64) and trains 300 steps of 8 x 256 bytes in a couple of minutes on a 2-core CPU.

`python -m blt.train_entropy --config=blt/configs/entropy_tiny.py --workdir=DIR`
"""
from common.configs.base import base_config, dense_model, tiny_run


def get_config():
  c = base_config()
  c.model = dense_model(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, window=64)
  c = tiny_run(c, seq_len=256)
  c.train.update(steps=300, warmup_steps=30)
  return c
