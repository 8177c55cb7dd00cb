"""GRPO (common/tasks/grpo.py) against google-tunix's definition on a hand-computed group, and a GRPO run on
the loop that is killed mid-way and rerun ends at the parameters of an uninterrupted one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.configs.base import base_config, dense_model
from common.models import build_model
from common.tasks import grpo
from common.tasks.base import Task
from common.tokenizers import ByteTokenizer
from common.train.loop import train
from common.train.restore import load_run_model


def test_advantages_are_normalised_within_each_group_with_the_sample_std():
  rewards = np.array([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0])
  std = np.sqrt(4 / 3)  # group 1: mean 0, squares sum 4 over n - 1 = 3
  expected = [1 / std, -1 / std, -1 / std, 1 / std]
  np.testing.assert_allclose(grpo.group_advantages(rewards, 4)[:4], expected, rtol=1e-5)
  # group 2: mean 0.5, sample std 1
  np.testing.assert_allclose(grpo.group_advantages(rewards, 4)[4:], [0.5, 0.5, 0.5, -1.5], rtol=1e-5)
  np.testing.assert_allclose(grpo.group_advantages(np.ones(4), 4), 0.0)  # a uniform group teaches nothing


class TableLM(nnx.Module):
  """Logits from a table per position (the loss reads only `model(inputs, positions, segment_ids)`)."""

  def __init__(self, logits):
    self.table = nnx.Param(jnp.asarray(logits, jnp.float32))

  def __call__(self, inputs, positions, segment_ids):
    return self.table[...]


def tunix_reference(logps, old, ref, mask, adv, eps_low, eps_high, beta, method):
  """The tunix loss written out per token and per sequence (sequence-mean-token-mean)."""
  losses = []
  for i in range(logps.shape[0]):
    terms = []
    for t in range(logps.shape[1]):
      if not mask[i, t]:
        continue
      rho = np.exp(np.clip(logps[i, t] - old[i, t], -20, 20))
      pg = max(-adv[i] * rho, -adv[i] * min(max(rho, 1 - eps_low), 1 + eps_high))
      d = ref[i, t] - logps[i, t]
      kl = {"low_var_kl": np.exp(d) - d - 1, "kl": logps[i, t] - ref[i, t], "mse_kl": 0.5 * d * d}[method]
      terms.append(pg + beta * kl)
    if terms:
      losses.append(np.mean(terms))
  return np.mean(losses)


@pytest.mark.parametrize("method", grpo.KL_METHODS)
def test_the_loss_matches_tunix_on_a_hand_computed_group(method):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 3, 5))
  targets = rng.integers(0, 5, size=(4, 3))
  mask = np.array([[0, 1, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], np.float32)  # row 3: no completion token
  advantages = grpo.group_advantages(np.array([1.0, -1.0, 1.0, -1.0]), 4)
  ref = rng.normal(size=(4, 3)) - 2
  logps = np.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  batch = dict(inputs=np.zeros((4, 3), np.int32), targets=targets, positions=np.zeros((4, 3), np.int32),
               segment_ids=np.ones((4, 3), np.int32), completion_mask=mask, advantages=advantages, ref_logps=ref)
  s = grpo.GRPOSettings(beta=0.1, kl_method=method)
  total, weight, sums = grpo.grpo_loss(TableLM(logits), batch, s)
  assert weight == 3  # the empty row is no sequence
  expected = tunix_reference(logps, logps, ref, mask, advantages, 0.2, 0.2, 0.1, method)
  assert float(total / weight) == pytest.approx(expected, rel=1e-5)
  # one update per rollout: the ratio is 1, so the gradient is -A/|o| d logp plus beta times the KL's
  grads = nnx.grad(lambda m: grpo.grpo_loss(m, batch, s)[0] / 3)(TableLM(logits))
  eps = 1e-3
  bumped = logits.copy()
  bumped[0, 1, 2] += eps
  up = tunix_reference(np.take_along_axis(jax.nn.log_softmax(bumped), targets[..., None], -1)[..., 0], logps,
                       ref, mask, advantages, 0.2, 0.2, 0.1, method)
  # the same difference with the old log-probabilities held fixed (the stop-gradient)
  assert float(grads.table[...][0, 1, 2]) == pytest.approx((up - expected) / eps, rel=2e-2, abs=1e-4)


def test_the_ratio_is_clipped_as_in_ppo():
  """With old log-probabilities apart from the current ones, the per-token term is the pessimistic one."""
  logps = np.log(np.array([[0.6, 0.3]]))
  for adv, old_p, expected in ((1.0, 0.4, -1.2), (-1.0, 0.4, 1.5), (1.0, 0.9, -2 / 3), (-1.0, 0.9, 0.8)):
    rho = 0.6 / old_p
    pg = max(-adv * rho, -adv * min(max(rho, 0.8), 1.2))
    assert pg == pytest.approx(expected)
    assert tunix_reference(logps, np.log([[old_p, 0.3]]), logps, np.array([[1, 0]]), [adv], 0.2, 0.2, 0.0,
                           "kl") == pytest.approx(expected)


def rows_for(prompts, completions):
  return grpo.rollout_rows(prompts, completions, 8)


def test_rollout_rows_mark_the_completion_targets():
  rows = rows_for([[5, 6, 7]], [[8, 9, 1]])
  np.testing.assert_array_equal(rows["inputs"][0], [5, 6, 7, 8, 9, 0, 0, 0])
  np.testing.assert_array_equal(rows["targets"][0], [6, 7, 8, 9, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows["completion_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])


STEPS, EVERY = 4, 2


def tiny_cfg():
  cfg = base_config()
  cfg.model = dense_model(vocab_size=384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
  cfg.train.update(steps=STEPS, batch_size=8, learning_rate=1e-2, warmup_steps=1, weight_decay=0.0)
  cfg.checkpoint.update(every_steps=EVERY, keep=3, async_save=False)
  cfg.log.update(every_steps=1, progress="lines")
  return cfg


def tiny_task(die_at_step=None):
  tokenizer, cfg = ByteTokenizer(), tiny_cfg()
  prompts = [tokenizer.encode("Q: 1+1\n"), tokenizer.encode("Q: 2+2\n"), tokenizer.encode("Q: 3+3\n")]
  settings = grpo.GRPOSettings(group_size=2, max_new_tokens=6)
  prompts_at = lambda step: [(prompts[(step + i) % 3], step) for i in range(4)]  # 4 groups of 2: the batch
  reward = lambda payload, text: 1.0 if "2" in text else -1.0
  build = lambda: build_model(cfg.model, seed=0)
  rollout = grpo.grpo_rollout(prompts_at=prompts_at, reward=reward, reference=build(), tokenizer=tokenizer,
                              settings=settings, seq_len=16)

  def maybe_die(model, step, key):
    if step == die_at_step:
      raise KeyboardInterrupt("killed")
    return rollout(model, step, key)

  return Task(build_model=build, loss_fn=lambda m, b: grpo.grpo_loss(m, b, settings), data=None,
              train_flops_per_example=0.0, units_per_example=16, rollout=maybe_die)


def test_a_grpo_run_killed_mid_way_and_rerun_ends_where_an_uninterrupted_one_does(tmp_path):
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  assert train(tiny_cfg(), whole, tiny_task()) == 0
  with pytest.raises(KeyboardInterrupt):
    train(tiny_cfg(), resumed, tiny_task(die_at_step=EVERY + 1))
  assert train(tiny_cfg(), resumed, tiny_task()) == 0
  final = lambda d: nnx.state(load_run_model(d, tiny_cfg(), tiny_task().build_model, key="workdir")[0], nnx.Param)
  a, b = jax.tree.leaves(final(whole)), jax.tree.leaves(final(resumed))
  start = jax.tree.leaves(nnx.state(tiny_task().build_model(), nnx.Param))
  assert any(not np.array_equal(x, y) for x, y in zip(a, start))  # it trained
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
