"""Kim et al. 2025, "ASTRO: Teaching Language Models to Reason by Reflecting and Backtracking In-Context"
(arXiv 2507.00417): step-level MCTS, search trees linearised into chains of thought that reflect and backtrack,
SFT on them, then RL with verifiable rewards (GRPO), in miniature. See README.md."""

import common  # noqa: F401  (first: its __init__ quiets C++ logging before anything imports JAX)
