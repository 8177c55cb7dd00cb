"""The loop with a task whose batches are rolled out from its current parameters (`Task.rollout`): a GRPO-style
policy on a contextual bandit with a verifiable reward learns (the mean reward in metrics.jsonl rises), and a
run that dies mid-way (no checkpoint at that step) and is rerun ends at the parameters of an uninterrupted one."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.configs.base import base_config
from common.tasks.base import Task
from common.train.loop import train
from common.train.restore import load_run_model

N_CONTEXTS = N_ACTIONS = 8
GROUP = 4  # samples per context; advantage = reward - the group's mean reward, over its std (GRPO)
BATCH = 32
STEPS, EVERY = 30, 10
MESHES_SEEN = {"rollout": set(), "loss": set()}  # the mesh set (jax.set_mesh) when each was traced


def _seen(where):
  MESHES_SEEN[where].add(tuple(jax.sharding.get_abstract_mesh().shape.items()))


class Policy(nnx.Module):
  """A table of action logits per context."""

  def __init__(self, rngs: nnx.Rngs):
    self.logits = nnx.Embed(N_CONTEXTS, N_ACTIONS, rngs=rngs)

  def __call__(self, contexts):
    return self.logits(contexts)


def reward(contexts, actions):
  """1 for the one right action of each context, else 0."""
  return (actions == (3 * contexts + 1) % N_ACTIONS).astype(jnp.float32)


@nnx.jit
def _rollout(model, key):
  _seen("rollout")
  context_key, action_key = jax.random.split(key)
  contexts = jnp.repeat(jax.random.randint(context_key, (BATCH // GROUP,), 0, N_CONTEXTS), GROUP)
  actions = jax.random.categorical(action_key, model(contexts))
  rewards = reward(contexts, actions)
  groups = rewards.reshape(-1, GROUP)
  advantages = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-6)
  return dict(contexts=contexts, actions=actions, advantages=advantages.reshape(-1)), dict(reward=rewards.mean())


def grpo_loss(model, batch):
  """Policy gradient: minus the advantage-weighted log-probability of the sampled actions."""
  _seen("loss")
  logp = jax.nn.log_softmax(model(batch["contexts"]))
  chosen = jnp.take_along_axis(logp, batch["actions"][:, None], axis=-1)[:, 0]
  return -jnp.sum(batch["advantages"] * chosen), jnp.float32(BATCH), {}


def bandit_task(die_at_step=None):
  def rollout(model, step, key):
    if step == die_at_step:
      raise KeyboardInterrupt("killed")
    return _rollout(model, key)

  return Task(build_model=lambda: Policy(nnx.Rngs(0)), loss_fn=grpo_loss, data=None, train_flops_per_example=0.0,
              units_per_example=1, throughput_key="samples_per_sec", rollout=rollout)


def bandit_cfg():
  cfg = base_config()
  cfg.model = dict(name="bandit_policy")
  cfg.train.update(steps=STEPS, batch_size=BATCH, learning_rate=0.3, warmup_steps=1, weight_decay=0.0)
  cfg.checkpoint.update(every_steps=EVERY, keep=5, async_save=False)
  cfg.log.update(every_steps=1, progress="lines")
  return cfg


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("bandit"))
  assert train(bandit_cfg(), workdir, bandit_task()) == 0
  return workdir


def test_the_mean_reward_rises(learned):
  rewards = [r["reward"] for r in rows(learned)]
  assert len(rewards) == STEPS
  first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
  assert first < 0.3 and last > 0.75, rewards  # chance: 1/8


def test_rollouts_and_steps_are_traced_under_the_runs_mesh(learned):
  """A data-only mesh is set too (not only an expert one), so kernels and layers see the mesh."""
  data_mesh = (("data", 8), ("fsdp", 1), ("tensor", 1), ("expert", 1))
  assert MESHES_SEEN == {"rollout": {data_mesh}, "loss": {data_mesh}}


def test_a_run_killed_mid_way_and_rerun_ends_where_an_uninterrupted_one_does(learned, tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(KeyboardInterrupt):
    train(bandit_cfg(), workdir, bandit_task(die_at_step=EVERY + 6))
  assert rows(workdir)[-1]["step"] == EVERY + 6  # steps past the checkpoint were run, then lost
  assert train(bandit_cfg(), workdir, bandit_task()) == 0
  final = lambda d: load_run_model(d, bandit_cfg(), bandit_task().build_model, key="workdir")
  (resumed, step), (uninterrupted, _) = final(workdir), final(learned)
  assert step == STEPS
  np.testing.assert_array_equal(resumed.logits.embedding[...], uninterrupted.logits.embedding[...])
  timing = ("samples_per_sec", "mfu", "hfu", "goodput", "step_time")
  strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]
  assert strip(rows(workdir)) == strip(rows(learned))
