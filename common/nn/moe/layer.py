"""Mixture-of-experts feed-forward layers as modules: `MoE` maps x [..., d_model] to the same shape and can
replace the SwiGLU of any `common.nn.Block`; its computation is `forward.moe_forward` (or its expert-parallel
form, `parallel.sharded_moe_forward`, under a mesh with an `expert` axis). Its auxiliary losses and routing
statistics are sown into an `nnx.Intermediate` named `moe_aux` that `pop_moe_aux` collects after the forward
pass (a Block cannot return them).

A token mask (True = real token; `Block` passes `segment_ids > 0`) keeps padding out of the routing and the
statistics; inside a train step (`common.nn.training_rng.in_training`) the layer uses its training capacity,
outside it the evaluation capacity (`forward` module doc).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.nn.moe import experts as experts_lib
from common.nn.moe import parallel
from common.nn.moe import router as router_lib
from common.nn.moe.forward import MoESettings, moe_forward
from common.nn.training_rng import in_training, next_training_key


class MoE(nnx.Module):
  """Mixture-of-experts SwiGLU feed-forward layer: x [..., d_model] -> [..., d_model].

  Token choice, top-k with k = 1 (Switch) or 2 (GShard, Artetxe et al. 2021), run with fixed expert
  capacity (`mode='capacity'`) or without dropping (`mode='dropless'`, grouped matmul); or expert choice
  (Zhou et al. 2022). Stored f32, experts computed in `dtype`, router always in f32."""

  def __init__(self, d_model: int, d_ff: int, settings: MoESettings, *, rngs: nnx.Rngs, dtype=jnp.float32,
               out_scale: float = 1.0, expert_parallel: bool = True):
    self.settings = settings
    self.router = router_lib.Router(d_model, settings.n_experts, rngs=rngs, noise_std=settings.router_noise)
    self.experts = experts_lib.Experts(settings.n_experts, d_model, d_ff, rngs=rngs, out_scale=out_scale)
    self.dtype = dtype
    self.expert_parallel = expert_parallel

  def params(self) -> dict:
    return dict(router=self.router.kernel[...], gate_up=self.experts.gate_up[...], down=self.experts.down[...])

  def apply(self, x: jax.Array, rng: jax.Array | None = None, *, mask: jax.Array | None = None,
            training: bool = True) -> tuple[jax.Array, dict]:
    """(y, aux) without sowing; rng enables router noise and second-expert sampling (training); mask [...]
    (x's leading shape, True = real token) keeps padding out; `training` False: the evaluation capacity."""
    shape = x.shape
    tokens = x.reshape(-1, shape[-1]).astype(self.dtype)
    flat_mask = None if mask is None else mask.reshape(-1)
    n_groups = self.settings.num_groups
    if tokens.shape[0] % n_groups:
      raise ValueError(f"moe.num_groups={n_groups} does not divide the {tokens.shape[0]} tokens of the batch")
    mesh = parallel.current_expert_mesh() if self.expert_parallel else None
    if mesh is not None:
      y, aux = parallel.sharded_moe_forward(self.settings, self.params(), tokens, rng, mesh, mask=flat_mask,
                                            training=training)
    else:
      y, aux = moe_forward(self.settings, self.params(), tokens.reshape(n_groups, -1, shape[-1]), rng,
                           mask=None if mask is None else flat_mask.reshape(n_groups, -1), training=training)
    return y.reshape(shape), aux

  def __call__(self, x: jax.Array, rng: jax.Array | None = None, *, mask: jax.Array | None = None) -> jax.Array:
    """Inside a model, without `rng`: the train step's key (`common.nn.training_rng`), none in evaluation;
    training or evaluation capacity as `in_training()` says."""
    y, aux = self.apply(x, rng if rng is not None else next_training_key(), mask=mask, training=in_training())
    self.sow(nnx.Intermediate, "moe_aux", aux)
    return y


def pop_moe_aux(model: nnx.Module) -> list[dict]:
  """Removes and returns the aux dicts sown by every MoE layer of `model` during its last forward pass(es),
  one per layer call, in no particular order."""
  state = nnx.pop(model, nnx.Intermediate)
  out = []
  for path, value in nnx.to_flat_state(state):
    if "moe_aux" in path:
      v = value.get_value() if hasattr(value, "get_value") else value
      out.extend(v if isinstance(v, tuple) else (v,))
  return out
