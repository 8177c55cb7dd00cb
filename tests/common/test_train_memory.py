"""The trainer's per-device memory for parameters and optimizer state against `common.plan`, on the 8 simulated
CPU devices, for Llama 3 1B and 8B widths (two layers, so that compiling stays quick): the trainer's state
init and train step are compiled on abstract inputs (nothing allocated) and XLA's memory analysis of each
program is compared with the plan, which assumes Adam's moments sharded like the parameters."""
import math

import jax
import numpy as np
import pytest
from flax import nnx

from common import plan, sharding
from common.config import load
from common.models import build_model
from common.tasks.base import Task
from common.tasks.lm import next_token_loss
from common.train.loop import train_state_init
from common.train.optim import learning_rate_schedule, make_optimizer
from common.train.step import make_train_step

MESHES = {"fsdp:8": {"fsdp": 8}, "fsdp:4 x tensor:2": {"fsdp": 4, "tensor": 2}}
SCALARS = 1024  # bytes: the state's scalars (step, counters) and XLA's tuple bookkeeping, not in the plan


def _setup(name, mesh_sizes):
  cfg = load(f"common/configs/{name}.py")
  cfg.model.n_layers = 2
  mesh = sharding.make_mesh(tuple(mesh_sizes.values()), tuple(mesh_sizes))
  task = Task(build_model=lambda: build_model(cfg.model, seed=0), loss_fn=next_token_loss, data=None,
              train_flops_per_example=0.0, units_per_example=1)
  optimizer = make_optimizer(cfg.train)
  graphdef, _, state_shardings, init = train_state_init(task, optimizer, mesh)
  planned = plan.make_plan(cfg, mesh_sizes)
  return cfg, mesh, graphdef, optimizer, state_shardings, init, (planned.param_gib + planned.optimizer_gib) * plan.GIB


def _local_bytes(abstract, shardings):
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


@pytest.mark.parametrize("name,mesh_name", [("llama3_1b", "fsdp:8"), ("llama3_1b", "fsdp:4 x tensor:2"),
                                            ("llama3_8b", "fsdp:4 x tensor:2")])
def test_state_init_holds_what_the_plan_counts(name, mesh_name):
  _, _, _, _, state_shardings, init, planned = _setup(name, MESHES[mesh_name])
  abstract = jax.eval_shape(init)
  local = _local_bytes(abstract, state_shardings)
  assert planned <= local <= planned + SCALARS
  compiled = init.lower().compile().memory_analysis()
  assert planned <= compiled.output_size_in_bytes <= planned + SCALARS


def test_adam_moments_are_sharded_like_their_parameters():
  _, _, _, _, state_shardings, _, _ = _setup("llama3_1b", MESHES["fsdp:4 x tensor:2"])
  by_path = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(state_shardings["params"])}
  moments = 0
  for path, s in jax.tree_util.tree_leaves_with_path(state_shardings["opt_state"]):
    key = jax.tree_util.keystr(path)
    for name in ("mu", "nu"):
      if f".{name}" in key:
        assert s == by_path[key.split(f".{name}", 1)[1]], key
        moments += 1
    if key.endswith(".count"):
      assert s.spec == jax.sharding.PartitionSpec()
  assert moments == 2 * len(by_path)


def test_compiled_train_step_takes_the_planned_state():
  """The train step as the loop compiles it (state in its shardings, a small batch): its arguments are the
  planned parameters + moments plus the batch, nothing replicated behind the plan's back."""
  cfg, mesh, graphdef, optimizer, state_shardings, init, planned = _setup("llama3_1b", MESHES["fsdp:8"])
  batch, seq = 8, 16
  batch_sharding = sharding.batch_sharding(mesh, 2)
  batch_abstract = {k: jax.ShapeDtypeStruct((batch, seq), dtype, sharding=batch_sharding) for k, dtype in (
      ("inputs", np.int32), ("targets", np.int32), ("positions", np.int32), ("segment_ids", np.int32),
      ("loss_mask", np.float32))}
  state_abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                jax.eval_shape(init), state_shardings)
  step = jax.jit(make_train_step(graphdef, next_token_loss, optimizer, learning_rate_schedule(cfg.train)),
                 in_shardings=(state_shardings, {k: batch_sharding for k in batch_abstract}),
                 out_shardings=(state_shardings, None), donate_argnums=0)
  with jax.set_mesh(mesh):
    analysis = step.lower(state_abstract, batch_abstract).compile().memory_analysis()
  batch_bytes = 5 * batch * seq * 4 // mesh.size
  assert planned + batch_bytes <= analysis.argument_size_in_bytes <= planned + batch_bytes + SCALARS
