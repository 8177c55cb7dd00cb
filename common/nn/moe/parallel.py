"""Expert parallelism: experts split over the `expert` mesh axis, tokens exchanged inside `jax.shard_map`.

Tokens are split over every batch axis of the mesh (`common.sharding.RULES['batch']`, which includes
`expert`), experts over `expert` only (GShard, Lepikhin et al. 2020, sec. 3.2). Each shard routes its own
groups of tokens, so the routing is identical to the unsharded layer's as long as each shard holds whole
groups; capacity buffers go to the experts' owners with one all-to-all and come back with another. The
dropless mode has no fixed buffer size: its rows travel in all-to-all buffers of a bounded size, with an
exact gather/reduce-scatter fallback for a call that would overflow them (`exchange.py`). Statistics are
averaged over all groups of all shards (each group weighted by its real tokens, `forward._group_mean`, summed
with a psum). The token mask travels with the tokens.

The path is taken when the layer is traced under a mesh (`jax.set_mesh`) whose `expert` axis has size > 1;
otherwise the plain layer runs and XLA's SPMD partitioner places it.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from common.sharding import RULES
from common.nn.moe.forward import MoESettings, moe_forward

EXPERT_AXIS = "expert"


def current_expert_mesh():
  """The mesh set by `jax.set_mesh` if it has an expert axis of size > 1, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or EXPERT_AXIS not in mesh.axis_names or mesh.shape[EXPERT_AXIS] == 1:
    return None
  return mesh


def token_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in RULES["batch"] if a in mesh.axis_names and mesh.shape[a] > 1)


def sharded_moe_forward(settings: MoESettings, params: dict, tokens: jax.Array, rng, mesh, *,
                        mask: jax.Array | None = None, training: bool = True):
  """tokens [T, d] (mask [T] bool or None) -> (y [T, d], aux), experts on the `expert` axis of `mesh`; the
  numbers of `moe_forward` on `tokens.reshape(num_groups, -1, d)`."""
  axes = token_axes(mesh)
  n_shards = math.prod(mesh.shape[a] for a in axes)
  ep = mesh.shape[EXPERT_AXIS]
  if settings.n_experts % ep:
    raise ValueError(f"moe.num_experts={settings.n_experts} is not divisible by the expert mesh axis ({ep})")
  if settings.num_groups % n_shards or tokens.shape[0] % n_shards:
    raise ValueError(f"moe.num_groups={settings.num_groups} must be a multiple of the {n_shards} token shards "
                     f"of the mesh {dict(mesh.shape)} for expert parallelism")
  local_groups = settings.num_groups // n_shards
  d = tokens.shape[-1]
  tok_spec = P(axes if len(axes) > 1 else axes[0], None)

  def body(router, gate_up, down, x, key, m):
    shard = 0
    for a in axes:
      shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
    y, aux = moe_forward(settings, dict(router=router, gate_up=gate_up, down=down),
                         x.reshape(local_groups, -1, d), key, mask=None if m is None else m.reshape(local_groups, -1),
                         training=training, group_offset=shard * local_groups, expert_axis=EXPERT_AXIS,
                         stat_axes=axes)
    return y.reshape(-1, d), aux

  key_spec = P() if rng is not None else None
  mask_spec = P(tok_spec[0]) if mask is not None else None
  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(P(), P(EXPERT_AXIS), P(EXPERT_AXIS), tok_spec, key_spec, mask_spec),
                     out_specs=(tok_spec, P()))
  return fn(params["router"], params["gate_up"], params["down"], tokens, rng, mask)
