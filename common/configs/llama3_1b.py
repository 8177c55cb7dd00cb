"""Llama 3.2 1B (Meta 2024, "The Llama 3 Herd of Models" and the Llama 3.2 model card): 16 layers, d 2048,
GQA 32/8 heads, SwiGLU 8192, tied 128256-token embeddings, RoPE theta 500k with Llama 3.1 scaling (x32).
Too big for a laptop: plan it with `python -m common.plan --config=common/configs/llama3_1b.py
--mesh=fsdp:128` (dense 8192-long attention needs about one sequence per device)."""
import ml_collections

from common.configs.base import base_config, dense_model


def llama3_rope_scaling(factor: float) -> ml_collections.ConfigDict:
  """Llama 3.1's RoPE frequency scaling (see common.nn.rope): original context 8192, low 1, high 4."""
  return ml_collections.ConfigDict(dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_len=8192))


def get_config():
  c = base_config()
  # vocab_size is fixed here (Llama 3's 128256-token tiktoken vocabulary), not taken from the data: train
  # with a non-byte vocabulary (data.vocab='spm' and a data.spm_model of at most 128256 pieces).
  c.model = dense_model(
      vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=0, d_ff=8192,
      rope_theta=500000.0, rope_scaling=llama3_rope_scaling(32.0), norm_eps=1e-5, tie_embeddings=True,
      dtype="bfloat16", remat="full")
  c.data.vocab = "spm"
  c.data.seq_len = 8192
  c.train.batch_size = 128            # 1M tokens a step
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.mesh.shape = (-1,)                # 1.2B parameters: FSDP alone suffices
  c.mesh.axes = ("fsdp",)
  return c
