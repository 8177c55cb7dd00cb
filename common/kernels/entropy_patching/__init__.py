"""Entropy patching (BLT, Pagnoni et al. 2024, Sec. 2.3) from an entropy model's logits: per-byte entropies,
patch starts by the global or monotonic rule, patch ids; a Pallas kernel and its jnp reference."""
from common.kernels.entropy_patching.ops import IMPLS, entropies, entropy_patching, resolve_impl
