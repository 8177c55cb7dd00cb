"""Compute dtypes by config name (`model.dtype`): parameters stay f32, activations and matmuls run in this."""
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
