"""Jiang et al. 2024, "Instruction-tuned Language Models are Better Knowledge Learners" (arXiv 2402.12847):
pre-instruction-tuning (QA pairs before documents) against continued pretraining and instruction tuning, in
miniature. See README.md."""

import common  # noqa: F401  (first: its __init__ quiets C++ logging before anything imports JAX)
