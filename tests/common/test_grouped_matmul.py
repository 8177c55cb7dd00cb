"""The grouped matmul (common.kernels.grouped_matmul): the Pallas kernels in interpret mode, the XLA:CPU tiled
loop and the ragged_dot reference against float64 loops over groups, forward and both backward products, at
awkward sizes (rows not a multiple of the tile, empty groups, one group holding every row, rows past the
groups), and row-sharded under a mesh of 8 simulated devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import sharding
from common.kernels.grouped_matmul import grouped_matmul, kernel, ops, reference
from common.nn.moe import MoE, MoESettings

BLOCKS = (8, 16, 16)  # tiny kernel tiles, so that 37 rows, k 20 and n 24 all straddle them
CASES = {
    "empty_groups_and_rows_past_groups": [5, 0, 13, 1, 0, 10],
    "one_group_holds_every_row": [0, 37, 0],
    "groups_span_several_tiles": [17, 20],
    "no_row_in_any_group": [0, 0],
}


def _inputs(sizes, m=37, k=20, n=24, seed=0):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
  grad = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  return lhs, rhs, grad, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("sizes", CASES.values(), ids=CASES.keys())
def test_reference_matches_loop_over_groups(sizes):
  lhs, rhs, grad, group_sizes = _inputs(sizes)
  np.testing.assert_allclose(reference.gmm(lhs, rhs, group_sizes), reference.gmm_loop(lhs, rhs, sizes),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(reference.tgmm(lhs, grad, group_sizes), reference.tgmm_loop(lhs, grad, sizes),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", CASES.values(), ids=CASES.keys())
def test_kernel_forward_and_transposed_products_match_loop(sizes):
  lhs, rhs, grad, group_sizes = _inputs(sizes)
  out = kernel.gmm(lhs, rhs, group_sizes, blocks=BLOCKS, interpret=True)
  np.testing.assert_allclose(out, reference.gmm_loop(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
  out_t = kernel.tgmm(lhs, grad, group_sizes, blocks=BLOCKS, interpret=True)
  np.testing.assert_allclose(out_t, reference.tgmm_loop(lhs, grad, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiling", [(8, 4), (16, 16), None], ids=["big8_small4", "one_size", "default_tiles"])
@pytest.mark.parametrize("sizes", CASES.values(), ids=CASES.keys())
def test_xla_tiles_forward_matches_loop(sizes, tiling):
  lhs, rhs, _, group_sizes = _inputs(sizes)
  out = grouped_matmul(lhs, rhs, group_sizes, impl="xla_tiles", tiling=tiling)
  np.testing.assert_allclose(out, reference.gmm_loop(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,tiling", [("interpret", BLOCKS), ("xla_tiles", (8, 4)), ("reference", None)])
@pytest.mark.parametrize("sizes", [CASES["empty_groups_and_rows_past_groups"], CASES["one_group_holds_every_row"]],
                         ids=["empty_groups", "one_group"])
def test_gradients_through_custom_vjp_match_float64_loops(impl, tiling, sizes):
  """d lhs = gmm(grad, rhs^T) and d rhs = tgmm(lhs, grad), against the loops; rows past the groups get no
  gradient."""
  lhs, rhs, grad, group_sizes = _inputs(sizes)
  fn = lambda a, b: jnp.sum(grouped_matmul(a, b, group_sizes, impl=impl, tiling=tiling) * grad)
  d_lhs, d_rhs = jax.jit(jax.grad(fn, argnums=(0, 1)))(lhs, rhs)
  rhs_t = np.swapaxes(np.asarray(rhs, np.float64), 1, 2)
  np.testing.assert_allclose(d_lhs, reference.gmm_loop(grad, rhs_t, sizes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_rhs, reference.tgmm_loop(lhs, grad, sizes), rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(d_lhs)[sum(sizes):])


def test_local_group_sizes_of_a_row_window():
  sizes = jnp.asarray([5, 0, 13, 1, 0, 10], jnp.int32)  # rows [0,5) [5,5) [5,18) [18,19) [19,19) [19,29)
  np.testing.assert_array_equal(ops.local_group_sizes(sizes, 4, 8), [1, 0, 7, 0, 0, 0])
  np.testing.assert_array_equal(ops.local_group_sizes(sizes, 16, 8), [0, 0, 2, 1, 0, 5])
  np.testing.assert_array_equal(ops.local_group_sizes(sizes, 32, 8), [0] * 6)


@pytest.mark.parametrize("impl,tiling", [("xla_tiles", (8, 4)), ("interpret", BLOCKS)])
def test_row_sharded_under_a_mesh_equals_unsharded(impl, tiling):
  """Under a mesh of 8 devices the rows are split in shard_map; outputs and both gradients are unchanged."""
  sizes = [9, 0, 30, 1, 24]  # 64 rows over 8 shards of 8: groups straddle shards, 0 rows past the groups
  lhs, rhs, grad, group_sizes = _inputs(sizes, m=64)
  loss = lambda a, b: jnp.sum(grouped_matmul(a, b, group_sizes, impl=impl, tiling=tiling) * grad)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  value, grads = step(lhs, rhs)
  mesh = sharding.make_mesh((8,), ("data",))
  with jax.set_mesh(mesh):
    program = str(jax.make_jaxpr(loss)(lhs, rhs))
    value_s, grads_s = step(lhs, rhs)
  assert "shard_map" in program
  np.testing.assert_allclose(value_s, value, rtol=1e-5)
  for g_s, g in zip(grads_s, grads):
    np.testing.assert_allclose(g_s, g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla_tiles", "interpret"])
def test_dropless_moe_layer_is_the_same_with_every_grouped_impl(impl):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 12, 16)), jnp.float32)

  def run(grouped_impl):
    layer = MoE(16, 32, MoESettings(4, mode="dropless", grouped_impl=grouped_impl), rngs=nnx.Rngs(params=0))
    loss = lambda m, x: jnp.sum(jnp.sin(m.apply(x)[0]))
    return nnx.value_and_grad(loss, argnums=(0, 1))(layer, x)

  (value, (g_layer, g_x)), (value_r, (g_layer_r, g_x_r)) = run(impl), run("reference")
  np.testing.assert_allclose(value, value_r, rtol=1e-5)
  np.testing.assert_allclose(g_x, g_x_r, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_layer), jax.tree.leaves(g_layer_r)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match="grouped_impl"):
    MoESettings(4, mode="dropless", grouped_impl="cuda")
  with pytest.raises(ValueError, match="impl"):
    ops.resolve_impl("cuda")
