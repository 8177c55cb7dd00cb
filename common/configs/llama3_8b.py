"""Llama 3 8B (Meta 2024, "The Llama 3 Herd of Models", table 3): 32 layers, d 4096, GQA 32/8 heads,
SwiGLU 14336, untied 128256-token embeddings, RoPE theta 500k with Llama 3.1 scaling (x8).
Plan it with `python -m common.plan --config=common/configs/llama3_8b.py --mesh=fsdp:32,tensor:8`."""
from common.configs.base import base_config, dense_model
from common.configs.llama3_1b import llama3_rope_scaling


def get_config():
  c = base_config()
  # vocab_size is fixed here (Llama 3's 128256-token vocabulary), not taken from the data: train with a
  # non-byte vocabulary (data.vocab='spm' and a data.spm_model of at most 128256 pieces).
  c.model = dense_model(
      vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=0, d_ff=14336,
      rope_theta=500000.0, rope_scaling=llama3_rope_scaling(8.0), norm_eps=1e-5, tie_embeddings=False,
      dtype="bfloat16", remat="full")
  c.data.vocab = "spm"
  c.data.seq_len = 8192
  c.train.batch_size = 256            # 2M tokens a step
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.mesh.shape = (-1, 8)              # tensor parallel within a node of 8, FSDP across nodes
  c.mesh.axes = ("fsdp", "tensor")
  return c
