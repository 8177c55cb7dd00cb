"""A 3 M-parameter dense LM on the embedded byte corpus: 300 steps in about three minutes on a 2-core CPU."""
from common.configs.base import base_config, dense_model


def get_config():
  c = base_config()
  c.model = dense_model(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768)
  c.train.batch_size = 8
  c.data.seq_len = 256
  c.data.max_train_bytes = 8_000_000
  return c
