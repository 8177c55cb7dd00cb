"""Pagnoni et al. 2024, "Byte Latent Transformer: Patches Scale Better Than Tokens" (arXiv 2412.09871). See README.md."""
