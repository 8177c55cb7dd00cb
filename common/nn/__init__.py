"""NNX layers shared by every model: norms, RoPE, attention, SwiGLU, embeddings, transformer blocks.

Every parameter carries logical axis names (`axes=` metadata) that `common.sharding.RULES` maps to the mesh.
"""
from common.nn.attention import Attention, attention_mask, dot_product_attention
from common.nn.dtypes import DTYPES
from common.nn.embed import Embed
from common.nn.linear import Linear
from common.nn.mlp import SwiGLU
from common.nn.norms import RMSNorm
from common.nn.rope import apply_rope, rope_frequencies
from common.nn.transformer import Block, BlockSpec
