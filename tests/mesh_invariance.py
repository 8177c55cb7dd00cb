"""One step of the shared train step on 1 device and on data 2 x fsdp 2 x tensor 2, for any model's Task:
the mesh changes placement only, never the loss, the gradient norm or the updated parameters (beyond float
rounding). Imported by the model tests of several packages."""
import chex
import jax
import numpy as np

from common import sharding
from common.train.loop import init_train_state
from common.train.optim import learning_rate_schedule, make_optimizer
from common.train.step import init_state, make_train_step


def assert_train_step_mesh_invariant(task, train_cfg, batch: dict) -> None:
  optimizer, schedule = make_optimizer(train_cfg), learning_rate_schedule(train_cfg)
  one = sharding.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  graphdef, _, state1 = init_train_state(task, optimizer, one)
  results = []
  for mesh in (one, sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))):
    # The same initial parameters, placed on this mesh by the rule table; the optimizer state follows them.
    params = jax.device_put(state1["params"], sharding.state_shardings(state1["params"], mesh))
    state = jax.jit(lambda p: init_state(p, optimizer))(params)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    step = jax.jit(make_train_step(graphdef, task.loss_fn, optimizer, schedule),
                   in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, None))
    with jax.set_mesh(mesh):  # as the trainer runs every step: kernels and MoE layers see the mesh
      new_state, metrics = step(state, jax.device_put(batch, batch_shardings))
    if mesh.size > 1:  # guards against a rule table that silently replicates everything
      assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(new_state["params"]))
    results.append((jax.device_get(metrics), jax.tree.map(np.asarray, new_state["params"])))
  (ref_metrics, ref_params), (metrics, params) = results
  assert np.isfinite(ref_metrics["loss"]) and ref_metrics["loss"] > 0
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)


def assert_sharded_layer_matches(layer, reference: tuple, sharded: tuple) -> None:
  """An expert-parallel layer (weights split on the `expert` axis) against its unsharded run: (outputs,
  auxiliary statistics, gradients) equal within float rounding."""
  (y, aux, grads), (y_s, aux_s, grads_s) = reference, sharded
  assert layer.experts.gate_up[...].sharding.spec[0] == "expert"
  np.testing.assert_allclose(np.asarray(y_s), np.asarray(y), rtol=1e-5, atol=1e-6)
  for key, value in aux.items():
    np.testing.assert_allclose(np.asarray(aux_s[key]), np.asarray(value), rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(grads_s, grads, rtol=1e-4, atol=1e-6)
