"""Hase et al. 2023, "Methods for Measuring, Updating, and Visualizing Factual Beliefs in Language Models"
(arXiv 2111.13654): SLAG learned-optimizer belief updates, consistency metrics and belief graphs, in miniature.
See README.md."""

import common  # noqa: F401  (first: its __init__ quiets C++ logging before anything imports JAX)
