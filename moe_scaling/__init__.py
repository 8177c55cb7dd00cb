"""Artetxe et al. 2021, "Efficient Large Scale Language Modeling with Mixtures of Experts" (arXiv 2112.10684):
sparse (MoE) LMs against dense LMs at matched compute, in miniature. See README.md."""

import common  # noqa: F401  (first: its __init__ quiets C++ logging before anything imports JAX)
