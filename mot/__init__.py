"""Liang et al. 2024, "Mixture-of-Transformers: A Sparse and Scalable Architecture for Multi-Modal Foundation Models" (arXiv 2411.04996). See README.md."""
