"""The paper's two model families and how each dense size is paired with an MoE model.

Dense: the shared Llama-style LM (`common.models.dense_lm`). MoE: the same dimensions with E experts in every
other FFN, top-2 token-choice routing with capacity factor 1 and fairseq's default second-expert rule
(`top2gating`, second_expert_policy 'sampling': the second expert drawn by Gumbel-max in training) and the
balancing loss weighted 0.01 (Artetxe et al. 2021, the set-up of table 1). Evaluation is dropless
(`eval_capacity_token_fraction` 0), so that a sequence's scores do not depend on its batch.

The pairing. The paper's MoE models keep the dense partner's shape with experts as wide as its FFN (the
parameter counts of table 1 say so: 16 MoE layers x 512 experts x 2 x 4096 x 16384 = 1.1T for the partner of
the 6.7B dense model) and call each pair compute-equivalent; counted exactly, top-2 runs two experts, one
expert FFN per MoE layer more than the dense model. The study here pairs on FLOPs per token, as the issue
asks: with `pairing='flops'` (the default) each expert is 1/top_k of the dense FFN width, so the experts a
token visits cost exactly the dense FFN and a pair differs only by the router (2 d E per MoE layer, under 1%
here). `pairing='shape'` keeps the paper's full-width experts. Either way `reproduce` compares the families on
a training-compute axis counted by `common.flops` (sec. 4's "compute-equivalent" curves), never per pair.
"""
from __future__ import annotations

import ml_collections

from common.configs.base import dense_model

PAIRINGS = ("flops", "shape")


def dense_shape(d_model: int) -> dict:
  """Model dimensions of a miniature size: heads of 32, d_ff = 4 d_model (the paper's GPT-3-like shapes use
  4 d; our SwiGLU has 3 matrices, so the FFN is 1.5x the paper's at the same d_ff), 4 layers."""
  return dict(d_model=d_model, n_layers=4, n_heads=max(1, d_model // 32), n_kv_heads=max(1, d_model // 32),
              d_ff=4 * d_model)


def model_config(family: str, d_model: int, *, num_experts: int = 8, top_k: int = 2, every: int = 2,
                 mode: str = "capacity", pairing: str = "flops") -> ml_collections.ConfigDict:
  """`family` 'dense' or 'moe' at size `d_model`; the MoE model is the dense one with experts (see above)."""
  if family not in ("dense", "moe"):
    raise ValueError(f"family must be 'dense' or 'moe', got '{family}'")
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}, got '{pairing}'")
  m = dense_model(**dense_shape(d_model))
  if family == "moe":
    expert_ff = m.d_ff // top_k if pairing == "flops" else 0  # 0: the dense d_ff
    m.moe.update(dict(num_experts=num_experts, top_k=top_k, every=every, mode=mode, capacity_factor=1.0,
                      second_policy="sampling", balance_weight=0.01, d_ff=expert_ff, eval_capacity_token_fraction=0.0))
  return m
