"""The paper's two model families and the objective that trains them.

Dense: the shared Llama-style LM (`common.models.dense_lm`). MoE: the same dimensions with E experts in every
other FFN, top-2 token-choice routing with capacity factor 1 (fairseq's `top2gating`), and the balancing loss
weighted 0.01 (Artetxe et al. 2021, sec. 2.1 and table 1, where each dense size is paired with an MoE model of
the same shape and 512 experts). Top-2 makes an MoE layer cost two experts' FFNs, so an MoE model has more
FLOPs per token than its dense partner (common.flops counts them); the study compares the families on a
loss-vs-compute axis, as the paper does, so the pairing need not be FLOP-exact.
"""
from __future__ import annotations

import ml_collections

from common.configs.base import dense_model


def dense_shape(d_model: int) -> dict:
  """Model dimensions of a miniature size: heads of 32, d_ff = 4 d_model (the paper's GPT-3-like shapes use
  4 d; our SwiGLU has 3 matrices, so the FFN is 1.5x the paper's at the same d_ff), 4 layers."""
  return dict(d_model=d_model, n_layers=4, n_heads=max(1, d_model // 32), n_kv_heads=max(1, d_model // 32),
              d_ff=4 * d_model)


def model_config(family: str, d_model: int, *, num_experts: int = 8, top_k: int = 2, every: int = 2,
                 mode: str = "capacity") -> ml_collections.ConfigDict:
  """`family` 'dense' or 'moe' at size `d_model`; the MoE model is the dense one with experts (the pairing)."""
  if family not in ("dense", "moe"):
    raise ValueError(f"family must be 'dense' or 'moe', got '{family}'")
  m = dense_model(**dense_shape(d_model))
  if family == "moe":
    m.moe.update(dict(num_experts=num_experts, top_k=top_k, every=every, mode=mode, capacity_factor=1.0,
                      balance_weight=0.01))
  return m

