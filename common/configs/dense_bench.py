"""The throughput/MFU benchmark model: a 28 M-parameter dense LM (d 512, 8 layers, 8 heads, SwiGLU 1536) on
the embedded byte corpus, f32, sequences of 512. Small enough to time on a CPU, matmul-bound enough that
MFU means something."""
from common.configs.base import base_config, dense_model


def get_config():
  c = base_config()
  c.model = dense_model(vocab_size=0, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1536,
                        tie_embeddings=False, dtype="float32", remat="none")
  c.data.seq_len = 512
  c.train.batch_size = 8
  return c
