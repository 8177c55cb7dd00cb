"""Pallas kernels, one folder each: kernel.py (Pallas), reference.py (pure jnp, same signature), ops.py
(dispatch between them and the custom VJP)."""
