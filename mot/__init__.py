"""Liang et al. 2024, "Mixture-of-Transformers: A Sparse and Scalable Architecture for Multi-Modal Foundation Models" (arXiv 2411.04996). See README.md."""

import common  # noqa: F401  (first: its __init__ quiets C++ logging before anything imports JAX)
