"""Pagnoni et al. 2024, "Byte Latent Transformer: Patches Scale Better Than Tokens" (arXiv 2412.09871). See README.md."""

import common  # noqa: F401  (first: its __init__ quiets C++ logging before anything imports JAX)
