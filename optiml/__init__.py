"""Iyer et al. 2022, "OPT-IML: Scaling Language Model Instruction Meta Learning through the Lens of
Generalization" (arXiv 2212.12017): an instruction-task bench with three levels of held-out evaluation, task
sampling, and a base model against its instruction-tuned version, in miniature. See README.md."""

import common  # noqa: F401  (first: its __init__ quiets C++ logging before anything imports JAX)
