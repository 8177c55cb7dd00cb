"""Artetxe et al. 2021, "Efficient Large Scale Language Modeling with Mixtures of Experts" (arXiv 2112.10684):
sparse (MoE) LMs against dense LMs at matched compute, in miniature. See README.md."""
