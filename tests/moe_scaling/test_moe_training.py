"""The study's MoE LM inside the shared trainer: router noise drawn from a key of the seed and the step (so it
varies between steps, repeats exactly given the seed, and is absent in evaluation), and expert parallelism
when the trainer's mesh has an `expert` axis (the shard_map path, with the numbers of one device)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common.configs.base import base_config
from common.models import build_model
from common.nn.moe import parallel
from common.tasks.lm import next_token_loss
from common.tasks.base import Task
from common.train.loop import init_train_state, train
from common.train.step import make_eval_step, make_train_step
from moe_scaling.model import model_config

VOCAB, SEQ, BATCH = 128, 16, 4


class SyntheticRows:
  """Random byte-like rows, one document each; the batch at a data position depends on the position only."""

  def train_batch(self, position):
    targets = np.random.default_rng(position).integers(3, VOCAB, (BATCH, SEQ), dtype=np.int32)
    inputs = np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], axis=1)
    return dict(inputs=inputs, targets=targets, segment_ids=np.ones_like(targets), loss_mask=np.ones(targets.shape,
                np.float32), positions=np.broadcast_to(np.arange(SEQ, dtype=np.int32), targets.shape).copy())

  def eval_batches(self, n):
    return iter(())


def moe_cfg(router_noise=1.0, steps=2, mesh_shape=(1,), mesh_axes=("data",)):
  cfg = base_config()
  cfg.model = model_config("moe", 32, num_experts=4)
  cfg.model.update(vocab_size=VOCAB, n_layers=2)
  cfg.model.moe.update(router_noise=router_noise, num_groups=2)
  cfg.data.seq_len = SEQ
  cfg.train.update(steps=steps, batch_size=BATCH, warmup_steps=1)
  cfg.checkpoint.update(every_steps=1000, async_save=False)
  cfg.log.update(every_steps=1, progress="lines")
  cfg.eval.every_steps = 1000
  cfg.mesh.update(shape=mesh_shape, axes=mesh_axes)
  return cfg


def make_task(cfg):
  return Task(build_model=lambda: build_model(cfg.model, seed=cfg.train.seed), loss_fn=next_token_loss,
              data=SyntheticRows(), train_flops_per_example=1e6, units_per_example=SEQ)


@pytest.fixture(scope="module")
def frozen_step():
  """A train step that never moves the parameters (learning rate 0), so that its metrics differ between
  steps only through the router noise; and the state and batch it runs on."""
  from common import sharding
  cfg = moe_cfg()
  # Evaluation with the training capacity (16 = 0.5 x the 32 tokens of a group) so that its loss is comparable.
  cfg.model.moe.eval_capacity_token_fraction = 0.5
  task = make_task(cfg)
  mesh = sharding.make_mesh((1,), ("data",), jax.devices()[:1])
  optimizer, schedule = optax.sgd(0.0), optax.constant_schedule(0.0)
  graphdef, _, state = init_train_state(task, optimizer, mesh)
  batch = {k: jnp.asarray(v) for k, v in task.data.train_batch(0).items()}
  steps = {seed: jax.jit(make_train_step(graphdef, next_token_loss, optimizer, schedule, seed=seed))
           for seed in (None, 0)}
  eval_step = jax.jit(make_eval_step(graphdef, next_token_loss))
  return steps, eval_step, state, batch


def _routing(metrics):
  return np.array([float(metrics[f"moe/load_{e}"]) for e in range(4)] + [float(metrics["loss"])])


def test_router_noise_changes_routing_from_step_to_step(frozen_step):
  steps, _, state, batch = frozen_step
  at = lambda step: _routing(steps[0](dict(state, step=jnp.int32(step)), batch)[1])
  assert not np.allclose(at(0), at(1))
  np.testing.assert_array_equal(at(1), at(1))  # the same seed and step, hence the same draw after a resume


def test_without_a_seed_and_in_evaluation_routing_is_noise_free(frozen_step):
  steps, eval_step, state, batch = frozen_step
  clean = [_routing(steps[None](dict(state, step=jnp.int32(s)), batch)[1]) for s in (0, 1)]
  np.testing.assert_array_equal(clean[0], clean[1])
  total, weight, _ = eval_step(state["params"], batch)
  np.testing.assert_allclose(float(total / weight), clean[0][-1], rtol=1e-6)
  noisy = _routing(steps[0](state, batch)[1])
  assert not np.allclose(noisy, clean[0])


def _losses(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]


def test_trainer_on_an_expert_mesh_takes_the_expert_parallel_path_with_the_same_numbers(tmp_path, monkeypatch):
  calls = []
  sharded = parallel.sharded_moe_forward
  monkeypatch.setattr(parallel, "sharded_moe_forward", lambda *a, **k: calls.append(1) or sharded(*a, **k))
  one = moe_cfg(router_noise=0.5, steps=3)
  assert train(one, str(tmp_path / "one"), make_task(one), devices=jax.devices()[:1]) == 0
  assert not calls
  ep = moe_cfg(router_noise=0.5, steps=3, mesh_shape=(2,), mesh_axes=("expert",))
  assert train(ep, str(tmp_path / "ep"), make_task(ep), devices=jax.devices()[:2]) == 0
  assert calls  # each MoE layer traced through shard_map + all_to_all
  # The losses of steps 2 and 3 are those of the parameters after one and two updates.
  np.testing.assert_allclose(_losses(tmp_path / "ep"), _losses(tmp_path / "one"), rtol=1e-5)
  assert len(_losses(tmp_path / "one")) == 3
