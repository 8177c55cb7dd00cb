"""The BLT shapes of the paper's FLOP-controlled study (Pagnoni et al. 2024, Table 10), for TPU pods and GPU meshes:
`--config=blt/configs/paper.py:size=400m|1b|8b[,entropy_model=DIR]`.

Too big for a laptop: plan one with `python -m common.plan --config=blt/configs/paper.py:size=1b --mesh=fsdp:64`
(memory per device, FLOPs, step time), train it on a pod with `python -m blt.train` and an entropy model's workdir
(`python -m blt.train_entropy`; the paper's is a 100M-parameter byte LM with a 512-byte window).

| size | encoder (layers, heads, width) | global (layers, heads, width) | decoder | cross-attention (heads, k) |
|---|---|---|---|---|
| 400m | 1, 12, 768 | 24, 10, 1280 | 7, 12, 768 | 12, 2 |
| 1b | 1, 16, 1024 | 25, 16, 2048 | 9, 16, 1024 | 16, 2 |
| 8b | 1, 20, 1280 | 32, 32, 4096 | 6, 20, 1280 | 20, 2 |

Where the numbers come from: the 1B row is the configuration of the released BLT-1B checkpoint (as the `BltConfig`
defaults of the transformers library reproduce it: also its SwiGLU widths 2816 / 5632, RoPE θ 500k, local window 512,
hash n-grams 3..8 with one function and 500,002 rows each, cross-attention from all decoder layers and after the last
encoder layer); the 400M and 8B layer counts, widths and heads are the paper's Table 10, whose per-part parameter
counts (7M / 470M / 50M and 20M / 6.4B / 120M) tests/blt/test_paper_configs.py checks. Their cross-attention heads
(one per 64 dimensions of the local width) and k = 2 follow the 1B checkpoint: an assumption, not a published value.
Patching as the released checkpoint: entropy patching with the global threshold (calibrated here to 4.5-byte patches).
SwiGLU widths are the official code's rule (8/3 d rounded up to a multiple of 256).

Training settings that are this codebase's choice, not the paper's: rows of 8,192 bytes with 2,048 patch slots
(entropy patches average 4.5 bytes in the paper, so a row needs ~1,820; bytes past the last slot join it), 512 rows
a step (4.2M bytes), bf16 compute with f32 parameters, learning rate 4e-4 (the official example config's) with 2,000
warmup steps and cosine decay to 10%.
"""
import ml_collections

from blt.model import blt_model
from common.config import config_args
from common.configs.base import base_config

# size -> (encoder, global, decoder layers/heads/width, cross-attention heads, SwiGLU widths local/global)
SHAPES = {
    "400m": dict(n_layers_encoder=1, n_layers_decoder=7, d_local=768, n_heads_local=12, n_heads_cross=12,
                 n_layers_global=24, d_global=1280, n_heads_global=10, d_ff_local=2048, d_ff_global=3584),
    "1b": dict(n_layers_encoder=1, n_layers_decoder=9, d_local=1024, n_heads_local=16, n_heads_cross=16,
               n_layers_global=25, d_global=2048, n_heads_global=16, d_ff_local=2816, d_ff_global=5632),
    "8b": dict(n_layers_encoder=1, n_layers_decoder=6, d_local=1280, n_heads_local=20, n_heads_cross=20,
               n_layers_global=32, d_global=4096, n_heads_global=32, d_ff_local=3584, d_ff_global=11008),
}
MESHES = {"400m": ((-1,), ("fsdp",)), "1b": ((-1,), ("fsdp",)), "8b": ((-1, 4), ("fsdp", "tensor"))}


def get_config(arg=None):
  a = config_args(arg, dict(size="1b", entropy_model=""))
  if a["size"] not in SHAPES:
    raise ValueError(f"size={a['size']!r}: expected one of {', '.join(SHAPES)}")
  c = base_config()
  c.model = blt_model(**SHAPES[a["size"]], local_window=512, hash_n_min=3, hash_n_max=8, hash_table_size=500_002,
                      cross_attn_k=2, rope_theta=500_000.0, dtype="bfloat16")
  c.model.patching = ml_collections.ConfigDict(dict(
      method="entropy", patch_size=4.5, max_patches=2048, threshold=0.0, calibrate=True,
      max_patch_length=0, entropy_model=a["entropy_model"], spm_model=""))
  c.data.seq_len = 8192
  c.train.update(batch_size=512, grad_accum=8, learning_rate=4e-4, warmup_steps=2000, steps=100_000)
  c.mesh.shape, c.mesh.axes = MESHES[a["size"]]
  return c
