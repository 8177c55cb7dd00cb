"""Grouped matmul (rows sorted by group, one weight matrix per group) for dropless MoE, MoMa's modality
experts and MoT's untied projections: Pallas kernels, jnp references, and a dispatching op with a custom VJP."""
from common.kernels.grouped_matmul.ops import IMPLS, grouped_matmul, resolve_impl, self_check
from common.kernels.grouped_matmul.reference import gmm, tgmm
