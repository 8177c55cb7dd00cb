"""Li et al. 2021, "EASE: Extractive-Abstractive Summarization End-to-End using the Information Bottleneck
Principle" (arXiv 2105.06982): an evidence extractor trained through the abstractor's loss, in miniature.
See README.md."""

import common  # noqa: F401  (first: its __init__ quiets C++ logging before anything imports JAX)
