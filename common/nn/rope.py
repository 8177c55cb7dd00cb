"""Rotary position embeddings (Su et al. 2021), with Llama 3.1's long-context frequency scaling."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2]. `scaling` is Llama 3.1's rule: keys `factor`, `low_freq_factor`,
  `high_freq_factor`, `original_max_len`; long wavelengths are divided by `factor`, short ones kept, and the
  band in between interpolated smoothly."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if not scaling:
    return inv.astype(np.float32)
  factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_len"]
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv
  smooth = (old_len / wavelen - low) / (high - low)
  blended = (1 - smooth) * inv / factor + smooth * inv
  out = np.where(wavelen > low_wavelen, inv / factor, np.where(wavelen < high_wavelen, inv, blended))
  return out.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates pairs (x[..., :d/2], x[..., d/2:]) of x [batch, length, heads, head_dim] by position * freq."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [batch, length, d/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
