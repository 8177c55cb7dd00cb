"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1):
a frozen projection W plus a trained low-rank update, h = x W + (alpha / r) x A B, with A [in, r] random and
B [r, out] zero so that training starts from the base model exactly (their eq. 3).

The adapter weights are `LoRAParam`s (a subclass of `nnx.Param`), so `LoRAParam` is the filter that selects
what to train, and `frozen_base` stops gradients into everything else. `merge_lora` folds the update into W
(section 4.1, "no additional inference latency") and leaves a plain dense model behind.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.linear import Linear

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRAParam(nnx.Param):
  """An adapter weight: the only parameters that LoRA fine-tuning updates."""


def _matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """x [..., in] @ w [in, *out] as one 2-D product (as `Linear` does); returns [..., *out]."""
  in_dim = w.shape[0]
  y = jnp.dot(x.reshape(-1, in_dim).astype(dtype), w.astype(dtype).reshape(in_dim, -1))
  return y.reshape(*x.shape[:-1], *w.shape[1:])


class LoRALinear(nnx.Module):
  """`Linear` with a rank-r adapter. Keeps the base `kernel` Variable under the same name, so a checkpoint
  of the base model maps onto it unchanged."""

  def __init__(self, base: Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
    if rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {rank}")
    self.kernel = base.kernel  # [in, *out], frozen
    self.out_shape, self.dtype = base.out_shape, base.dtype
    in_dim = self.kernel.shape[0]
    axes = self.kernel.get_metadata().get("axes") or (None,) * self.kernel.ndim
    # A ~ N(0, 1/in) (the reference code uses Kaiming-uniform, the same scale up to a constant); B = 0.
    a = jax.random.normal(rngs.params(), (in_dim, rank), jnp.float32) / math.sqrt(in_dim)
    self.lora_a = LoRAParam(a, axes=(axes[0], None))  # [in, r]
    self.lora_b = LoRAParam(jnp.zeros((rank, *self.out_shape), jnp.float32), axes=(None, *axes[1:]))  # [r, *out]
    self.scale = float(alpha) / rank

  def __call__(self, x: jax.Array) -> jax.Array:
    base = _matmul(x, self.kernel[...], self.dtype)
    update = _matmul(_matmul(x, self.lora_a[...], self.dtype), self.lora_b[...], self.dtype)
    return base + jnp.asarray(self.scale, self.dtype) * update

  def merged_kernel(self) -> jax.Array:
    """W + (alpha / r) A B, [in, *out] f32."""
    a, b = self.lora_a[...], self.lora_b[...]
    delta = jnp.dot(a, b.reshape(b.shape[0], -1)).reshape(self.kernel.shape)
    return self.kernel[...] + self.scale * delta


def _children(model: nnx.Module, kind: type) -> list[tuple[nnx.Module, str]]:
  """(parent, attribute) of every sub-module of type `kind`."""
  found = []
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      for name, value in list(vars(node).items()):
        if isinstance(value, kind):
          found.append((node, name))
  return found


def apply_lora(model: nnx.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS, *,
               rngs: nnx.Rngs) -> nnx.Module:
  """Replaces, in place, every `Linear` held under an attribute named in `targets` (of the dense LM: q, k, v,
  o in attention; gate, up, down in the SwiGLU; lm_head) by a `LoRALinear`; returns the model. A target
  that names no Linear is a ValueError, so a typo cannot silently train nothing. MoE experts (stacked
  parameters, not Linear layers) are left as they are."""
  targets = tuple(targets)
  sites = [(parent, name) for parent, name in _children(model, Linear) if name in targets]
  missing = sorted(set(targets) - {name for _, name in sites})
  if missing:
    raise ValueError(f"no Linear layer named {missing} in {type(model).__name__}")
  for parent, name in sites:
    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, rngs=rngs))
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds each adapter into its base kernel and puts a plain `Linear` back, in place; returns the model."""
  for parent, name in _children(model, LoRALinear):
    adapted = getattr(parent, name)
    kernel = adapted.kernel
    in_dim = kernel.shape[0]
    plain = nnx.eval_shape(lambda: Linear(in_dim, adapted.out_shape, axes=(None,) * kernel.ndim,
                                          rngs=nnx.Rngs(0), dtype=adapted.dtype))
    kernel.set_value(adapted.merged_kernel())
    plain.kernel = kernel
    setattr(parent, name, plain)
  return model


def frozen_base(model: nnx.Module) -> nnx.Module:
  """The same model with gradients stopped on every parameter but the adapters: differentiating a loss of
  it gives exactly zero for the base weights (use inside the loss function)."""
  graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
  return nnx.merge(graphdef, adapters, jax.tree.map(jax.lax.stop_gradient, rest))


def adapter_count(model: nnx.Module) -> int:
  """Number of adapter weights, r (in + out) per adapted layer."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
