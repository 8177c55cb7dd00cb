"""Lin et al. 2024, "MoMa: Efficient Early-Fusion Pre-training with Mixture of Modality-Aware Experts"
(arXiv 2407.21770): modality-grouped expert-choice experts and mixture-of-depths in an early-fusion LM."""

import common  # noqa: F401  (first: its __init__ quiets C++ logging before anything imports JAX)
