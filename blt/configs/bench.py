"""The BLT throughput benchmark model (issue 3, `python -m bench.blt_throughput`): global transformer d 512 x 6
layers, local encoder 1 and decoder 2 layers of d 256 with windowed causal self-attention (window 512, the
paper's local attention, Sec. 3.2), hash n-gram tables n = 3..8 of 50,000 rows (Sec. 3.2.1), static patches of
4 bytes, rows of 2048 bytes, batch 4, f32 on CPU.

Heads of 64 dimensions everywhere (4 local, 8 global, 4 cross). SwiGLU widths 768 (local) and 1536 (global):
2/3 of 4 d rounded up to a multiple of 256, the Llama feed-forward rule the reference implementation inherits,
so that the FLOPs per byte match the configuration the issue's reference throughput was measured on.
"""
import ml_collections

from blt.model import blt_model
from common.configs.base import base_config


def get_config():
  c = base_config()
  c.model = blt_model(d_local=256, n_heads_local=4, local_window=512, d_ff_local=768, n_layers_encoder=1,
                      n_layers_decoder=2, n_heads_cross=4, d_global=512, n_layers_global=6, n_heads_global=8,
                      d_ff_global=1536, hash_n_min=3, hash_n_max=8, hash_table_size=50_000)
  c.model.patching = ml_collections.ConfigDict(dict(
      method="static", patch_size=4, max_patches=0, threshold=0.0, max_patch_length=0))
  c.data.update(seq_len=2048, max_train_bytes=4_000_000, max_eval_bytes=400_000)
  c.train.batch_size = 4
  return c
