"""The model sections of the MoMa comparison: dense, mixed-modal expert choice, MoMa, MoMa + MoD.

FLOPs matching (MoMa compares architectures at equal FLOPs per token): every expert is as wide as the dense
FFN and expert choice with capacity factor 1 processes each group's N_m tokens once in all (E_m experts x N_m / E_m
tokens), so the active FFN FLOPs per token of 'moe' and 'moma' equal the dense FFN's; they differ from the
dense model only by the router (2 d E per expert layer). 'moe' has as many experts as 'moma' in total (one
mixed-modal group), so the two also match in parameters. Mixture-of-depths runs `mod_capacity` of the tokens
through each routed layer, so 'moma_mod' costs fewer FLOPs per token than the others at the same shape:
`common.flops.training_flops_per_token` counts it exactly and comparisons are made on that axis.
"""
from __future__ import annotations

import ml_collections

from common.configs.base import dense_model

VARIANTS = ("dense", "moe", "moma", "moma_mod")


def moma_section(**overrides) -> ml_collections.ConfigDict:
  """`model.moma` with its defaults: no experts (dense) and no MoD layers."""
  s = ml_collections.ConfigDict(dict(
      experts=(),             # experts per modality group (text, image[, audio]); (E,) = one mixed-modal group
      every=1,                # expert FFN in every `every`-th layer
      capacity_factor=1.0,    # expert e of group m takes ceil(capacity_factor * N_m / E_m) tokens
      routing_groups=1,       # tokens ranked within this many equal slices of the batch; 0 = each sequence
      router_noise=0.0,       # logistic (Gumbel-sigmoid) noise on the router logits, training only
      z_loss_weight=0.0,
      d_ff=0,                 # expert width; 0 = model.d_ff (FLOPs-matched with the dense FFN)
      grouped_impl="auto",
      expert_parallel=True,
      exchange_slack=2.0,     # expert-parallel all-to-all buffers, in even shares of a shard's rows
      mod_layers=(),          # 0-based indices of the layers wrapped in mixture-of-depths; () = none
      mod_capacity=0.25,      # share of each row's real tokens a routed layer processes
  ))
  s.update(overrides)
  return s


def moma_model(variant: str = "moma", *, text_experts: int = 4, image_experts: int = 4, audio_experts: int = 0,
               mod_capacity: float = 0.25, moma: dict | None = None, **overrides) -> ml_collections.ConfigDict:
  """Model section of `variant` ('dense' | 'moe' | 'moma' | 'moma_mod') over the dense LM's shape
  (`common.configs.base.dense_model(**overrides)`). Modality groups in MODALITIES order; `audio_experts` > 0
  adds the audio group. 'moma_mod' wraps every other layer (1, 3, ...; Raposo et al. 2024 route every other
  block) with `mod_capacity` of the tokens. `moma`: overrides of the `model.moma` keys."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got '{variant}'")
  m = dense_model(**overrides)
  del m["moe"]
  m.name = "moma_lm"
  groups = (text_experts, image_experts) + ((audio_experts,) if audio_experts else ())
  experts = {"dense": (), "moe": (sum(groups),), "moma": groups, "moma_mod": groups}[variant]
  mod = dict(mod_layers=tuple(range(1, m.n_layers, 2)), mod_capacity=mod_capacity) if variant == "moma_mod" else {}
  m.moma = moma_section(experts=experts, **mod)
  if moma:
    m.moma.update(moma)
  return m
