"""Complementary explanations for in-context learning (Ye et al. 2023, arXiv 2211.13892): explanation
perturbations and maximal-marginal-relevance exemplar selection, on a small meta-trained dense LM."""
import common  # noqa: F401  (the shared library's set-up first)
