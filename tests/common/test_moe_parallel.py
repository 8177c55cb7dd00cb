"""Expert parallelism (common.nn.moe.parallel) on 8 simulated devices: experts split over the `expert` mesh
axis, tokens exchanged inside shard_map, the same numbers (outputs, statistics, gradients) as the unsharded
layer with the same groups, also with padding (uneven real tokens per group and shard, one group all padding)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import sharding
from common.nn.moe import MoE, MoESettings
from tests.mesh_invariance import assert_sharded_layer_matches

D, FF, E = 8, 16, 8


def _loss(layer, x, mask):
  y, aux = layer.apply(x, mask=mask)
  return jnp.sum(y * jnp.cos(x)) + aux["aux_loss"], (y, aux)

# Real tokens per group of 6 (a group per row of x): uneven over groups and over shards, one group empty.
REAL_PER_GROUP = np.array([6, 0, 3, 5, 1, 6, 2, 4])


_value_and_grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))


@pytest.mark.parametrize("mesh_shape,mesh_axes,masked", [((8,), ("expert",), False),
                                                          ((2, 4), ("data", "expert"), False),
                                                          ((2, 4), ("data", "expert"), True)])
@pytest.mark.parametrize("settings", [dict(mode="capacity", capacity_factor=0.5), dict(mode="dropless"),
                                      dict(mode="dropless", exchange_slack=8.0),
                                      dict(routing="expert_choice", capacity_factor=2.0)],
                         ids=["capacity", "dropless", "dropless_no_overflow", "expert_choice"])
def test_expert_sharded_layer_equals_unsharded(mesh_shape, mesh_axes, masked, settings):
  layer = MoE(D, FF, MoESettings(E, num_groups=8, z_loss_weight=1e-3, **settings), rngs=nnx.Rngs(params=0))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 6, D)), jnp.float32)
  mask = jnp.asarray(np.arange(6)[None] < REAL_PER_GROUP[:, None]) if masked else None
  (loss, (y, aux)), grads = _value_and_grad(layer, x, mask)

  mesh = sharding.make_mesh(mesh_shape, mesh_axes)
  state = nnx.state(layer)
  placed = jax.device_put(state, sharding.state_shardings(state, mesh))
  nnx.update(layer, placed)
  x_sharded = jax.device_put(x, sharding.batch_sharding(mesh, 3))
  mask_sharded = None if mask is None else jax.device_put(mask, sharding.batch_sharding(mesh, 2))
  with jax.set_mesh(mesh):
    (loss_s, (y_s, aux_s)), grads_s = _value_and_grad(layer, x_sharded, mask_sharded)
    program = str(jax.make_jaxpr(lambda x: layer.apply(x, mask=mask_sharded)[0])(x_sharded))
  assert "shard_map" in program and "all_to_all" in program
  assert_sharded_layer_matches(layer, (y, aux, grads), (y_s, aux_s, grads_s))
  if settings.get("mode") == "capacity":
    assert float(aux["fraction_dropped"]) > 0  # the case exercises dropping
  if masked:
    assert not np.asarray(y)[~np.asarray(mask)].any()


def test_expert_parallel_needs_whole_groups_per_shard():
  layer = MoE(D, FF, MoESettings(E, num_groups=2), rngs=nnx.Rngs(params=0))
  mesh = sharding.make_mesh((8,), ("expert",))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="num_groups"):
    layer.apply(jnp.zeros((8, 4, D)))
