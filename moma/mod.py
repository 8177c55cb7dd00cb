"""Mixture-of-depths: the depth sparsity of MoMa (Lin et al. 2024, arXiv 2407.21770, sec. 2.3), after Raposo et
al. 2024, "Mixture-of-Depths" (arXiv 2404.02258, sec. 3).

A linear router gives each token a scalar weight r; in each row the top `ceil(capacity * n)` of its n real
tokens (segment id > 0; padding is never chosen and takes no slot) go through the whole block (attention and
FFN) and come out as x + sigmoid(r) * (block(x) - x), the weight keeping the router on the gradient path; every
other token skips the block on the residual stream, unchanged. The chosen tokens are gathered in their original
order and run with their own positions and segment ids, so causality among them and RoPE stay right, then
scattered back. The attention of a routed layer therefore sees only the chosen tokens, and an expert FFN inside
it routes among them only. The gathered buffer has the static `ceil(capacity * L)` slots of a row without
padding; the slots a row with padding leaves over run masked out (segment id -1, modality -1) and their result
is dropped.

Top-k over a row is not causal (whether token t is chosen depends on later tokens); MoMa sec. 2.4 predicts the
choice with auxiliary routers at inference. With a supplied selection `selected` [B, L] (any number per row;
padding never goes through) the layer runs every token with the others masked out of the attention (segment
id -1) and out of the expert routing (modality -1) and keeps the update of the selected ones: the same function
as the gathered form, computed at full length (for evaluating the causal path, not for speed).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def tokens_per_row(length: int, capacity: float) -> int:
  """Tokens a routed layer processes in a row of `length`: ceil(capacity * length), at least 1."""
  return max(1, min(length, math.ceil(capacity * length)))


def top_tokens(router_logits: jax.Array, real: jax.Array, capacity: float) -> tuple[jax.Array, jax.Array]:
  """(idx [B, k], chosen [B, k] bool): the k = `tokens_per_row(L, capacity)` slots of each row in increasing
  position order and which of them hold its chosen tokens, the `tokens_per_row(n, capacity)` highest router
  logits of its n real tokens (real [B, L] bool; ties: lower index)."""
  length = router_logits.shape[1]
  quota = jnp.asarray([0] + [tokens_per_row(n, capacity) for n in range(1, length + 1)])[jnp.sum(real, axis=1)]
  _, ranked = jax.lax.top_k(jnp.where(real, router_logits, -jnp.inf), tokens_per_row(length, capacity))
  chosen = _put(length, ranked, jnp.arange(ranked.shape[1]) < quota[:, None])  # [B, L]
  idx = jnp.sort(ranked, axis=-1)
  return idx, _take(chosen, idx)


def _take(a: jax.Array, idx: jax.Array) -> jax.Array:
  """a [B, L, ...] at idx [B, k] -> [B, k, ...]."""
  return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def _put(length: int, idx: jax.Array, values: jax.Array) -> jax.Array:
  """values [B, k, ...] at idx [B, k] of zeros [B, length, ...]."""
  rows = jnp.arange(idx.shape[0])[:, None]
  return jnp.zeros((idx.shape[0], length) + values.shape[2:], values.dtype).at[rows, idx].set(values)


class DepthRouter(nnx.Module):
  """x [B, L, d_model] -> router logits [B, L] in f32 (a bias-free linear map to one scalar)."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs):
    std = 1.0 / math.sqrt(d_model)
    self.kernel = nnx.Param(std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (d_model,), jnp.float32),
                            axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("bld,d->bl", x.astype(jnp.float32), self.kernel[...], precision=jax.lax.Precision.HIGHEST)


class MixtureOfDepths(nnx.Module):
  """A routed layer around `block`, a module called as block(x, positions, segment_ids, modality,
  expert_selected) -> (output, info) with info's arrays [B, n, ...] over the tokens it ran."""

  def __init__(self, block: nnx.Module, d_model: int, capacity: float, *, rngs: nnx.Rngs):
    self.block = block
    self.router = DepthRouter(d_model, rngs=rngs)
    self.capacity = float(capacity)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, modality: jax.Array, *,
               selected: jax.Array | None = None, expert_selected: jax.Array | None = None):
    """(x [B, L, d], info): info holds the router input and logits, `mod_selected` [B, L] bool, and the block's
    info over all L tokens (zeros where skipped). `selected` / `expert_selected`: supplied decisions."""
    r = self.router(x)  # [B, L]
    weight = jax.nn.sigmoid(r)
    real = segment_ids > 0
    if selected is None:
      idx, chosen = top_tokens(r, real, self.capacity)
      xs = _take(x, idx)
      out, info = self.block(xs, _take(positions, idx), jnp.where(chosen, _take(segment_ids, idx), -1),
                             jnp.where(chosen, _take(modality, idx), -1),
                             None if expert_selected is None else _take(expert_selected, idx))
      update = jnp.where(chosen[..., None], xs + _take(weight, idx)[..., None].astype(x.dtype) * (out - xs), xs)
      x = x.at[jnp.arange(x.shape[0])[:, None], idx].set(update.astype(x.dtype))
      selected = _put(x.shape[1], idx, chosen)
      keep = lambda v: jnp.where(chosen.reshape(chosen.shape + (1,) * (v.ndim - 2)), v, jnp.zeros((), v.dtype))
      info = {k: None if v is None else _put(x.shape[1], idx, keep(v)) for k, v in info.items()}
    else:
      selected = selected.astype(bool) & real
      out, info = self.block(x, positions, jnp.where(selected, segment_ids, -1), jnp.where(selected, modality, -1),
                             expert_selected)
      x = jnp.where(selected[..., None], x + weight[..., None].astype(x.dtype) * (out - x), x)
    self.sow(nnx.Intermediate, "mod_aux", dict(
        selected_fraction=jnp.sum(selected) / jnp.maximum(jnp.sum(real), 1),
        router_weight=jnp.sum(jnp.where(selected, weight, 0.0)) / jnp.maximum(jnp.sum(selected), 1)))
    return x, dict(info, mod_selected=selected, mod_logits=r)
