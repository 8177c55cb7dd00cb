"""What the benchmarks share: a median wall time that waits for the device, and the fwd+bwd step of an FFN
layer (dense SwiGLU or MoE) that the MoE benchmarks compare."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def median_seconds(fn, *args, repeats: int, warmup: int = 1) -> tuple[float, object]:
  """(median seconds of `repeats` calls of fn(*args) after `warmup` untimed ones (compilation), the last
  result); each call is blocked on until its outputs are ready."""
  out = None
  for _ in range(warmup):
    out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


def ffn_grad_step(module: nnx.Module):
  """(jitted gradient of sum(y^2) w.r.t. the layer's parameters and its input, the parameters) of a dense
  FFN (`module(x)`) or an MoE layer (`module.apply(x)[0]`)."""
  graphdef, params = nnx.split(module, nnx.Param)

  def loss(p, x):
    m = nnx.merge(graphdef, p)
    y = m(x) if not hasattr(m, "apply") else m.apply(x)[0]
    return jnp.sum(y.astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), params
