"""The learned optimizer's update and the SLAG terms: a hypernetwork with zero output leaves the classifier
bit for bit as it was, its factors have the rank they claim, the KL term vanishes for an unchanged model,
and the off-the-shelf baselines stop as soon as the update succeeds."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.configs.base import dense_model
from common.tokenizers import load_tokenizer
from slag import data as slag_data
from slag.model import BeliefClassifier, ConditionedUpdate, HyperNetwork, opt_config, target_filter
from slag.evaluate import run_chains
from slag.update import (Functional, baseline_update, baseline_updater, episode_loss, kl_to_original,
                         learned_update, make_optimizer)

MODEL = dense_model(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, vocab_size=384)


@functools.cache
def _built():
  cfg = opt_config(n_layers=2, edit_layers=2, matrices=("down", "up"), cond_dim=16, hidden=16)
  classifier = BeliefClassifier(MODEL, rngs=nnx.Rngs(params=0))
  fn = Functional.split(classifier, target_filter(cfg))
  shapes = [tuple(x.shape) for x in jax.tree.leaves(fn.params)]
  hyper = HyperNetwork(cfg, 384, 32, shapes, rngs=nnx.Rngs(params=1))
  kb = slag_data.generated_kb(6, 2, 0.5, seed=0)
  beliefs = list(kb.beliefs)
  points = slag_data.point_arrays(beliefs, np.array([b.label for b in beliefs]), load_tokenizer("byte"), 48, 64)
  return cfg, classifier, fn, hyper, points


def setup():
  """One small classifier, hypernetwork and set of points for every test (each gets its own hypernetwork)."""
  cfg, classifier, fn, hyper, points = _built()
  return cfg, classifier, fn, nnx.clone(hyper), points


def point(points, i):
  return {k: jnp.asarray(v[i]) for k, v in points.items() if k != "label"}


def test_the_targets_are_the_named_ffn_matrices_of_the_last_layers():
  _, _, fn, _, _ = setup()
  paths = [tuple(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(fn.params)[0]]
  assert len(paths) == 4 and {p[4] for p in paths} == {"down", "up"}


def zero_output(hyper):
  for update in hyper.updates:
    update.out.kernel.value = jnp.zeros_like(update.out.kernel.value)
    update.out.bias.value = jnp.zeros_like(update.out.bias.value)


def test_a_hypernetwork_with_zero_output_leaves_the_parameters_bit_for_bit():
  _, _, fn, hyper, points = setup()
  zero_output(hyper)
  hyper_graph, hyper_state = nnx.split(hyper)
  run = jax.jit(lambda h, params: learned_update(nnx.merge(hyper_graph, h), fn, params, point(points, 0), steps=2))
  new = run(hyper_state, fn.params)
  for before, after in zip(jax.tree.leaves(fn.params), jax.tree.leaves(new)):
    assert np.array_equal(np.asarray(before), np.asarray(after))


@pytest.mark.parametrize("rank", [1, 3])
def test_the_update_factors_have_the_rank_they_claim(rank):
  update = ConditionedUpdate((24, 20), 8, 16, rank, 1.0, rngs=nnx.Rngs(params=2))
  condition = jax.random.normal(jax.random.key(0), (8,))
  a, b, _ = update.factors(condition)
  assert np.linalg.matrix_rank(np.asarray(a)) == rank and np.linalg.matrix_rank(np.asarray(b)) == rank
  # a rank-1 gradient: grad * a + b has rank at most 2 * rank
  u, v = jax.random.normal(jax.random.key(1), (24,)), jax.random.normal(jax.random.key(2), (20,))
  delta = update(condition, jnp.outer(u, v))
  assert np.linalg.matrix_rank(np.asarray(delta)) <= 2 * rank
  assert np.linalg.matrix_rank(np.asarray(update(condition, jnp.zeros((24, 20))))) == rank


def test_the_kl_term_is_zero_for_an_unchanged_model_and_positive_otherwise():
  logits = jax.random.normal(jax.random.key(0), (5, 2))
  assert float(kl_to_original(logits, logits)) == pytest.approx(0.0, abs=1e-7)
  assert float(kl_to_original(logits, logits + jnp.array([1.0, -1.0]))) > 0


def test_the_slag_objective_of_a_no_op_update_has_no_kl_and_each_term_switches_on():
  _, _, fn, hyper, points = setup()
  zero_output(hyper)
  rows = slag_data.episodes(points, 1, 1, 3, seed=0)
  episode = {k: jnp.asarray(v[0]) for k, v in rows.items()}
  plain = dict(n_layers=2, edit_layers=2, matrices=("down", "up"), paraphrase_weight=0.0, entailed_weight=0.0,
               retain_weight=0.0)
  configs = [opt_config(**plain, kl_weight=1.0), opt_config(**plain, kl_weight=0.0),
             opt_config(**{**plain, "paraphrase_weight": 1.0}, kl_weight=1.0)]
  hyper_graph, hyper_state = nnx.split(hyper)
  losses = jax.jit(lambda h: [episode_loss(nnx.merge(hyper_graph, h), fn, fn.params, episode, c)[0]
                              for c in configs])(hyper_state)
  with_kl, without_kl, with_paraphrases = (float(x) for x in losses)
  assert with_kl == pytest.approx(without_kl, abs=1e-6)  # an unchanged model: the KL term is 0
  assert with_paraphrases > with_kl


def test_the_baseline_stops_when_the_prediction_is_already_the_desired_label():
  _, classifier, _, _, points = setup()
  fn = Functional.split(classifier, nnx.Param)
  optimizer = make_optimizer("adam", 1e-2)
  step = baseline_updater(fn, optimizer)
  p = point(points, 0)
  pred = int(jnp.argmax(fn.logits(fn.params, p["main"][None], p["main_len"][None])[0]))
  p["desired"] = jnp.asarray(pred)
  params, taken = baseline_update(fn, fn.params, p, optimizer, step, max_steps=5)
  assert taken == 0 and params is fn.params
  p["desired"] = jnp.asarray(1 - pred)
  params, taken = baseline_update(fn, fn.params, p, optimizer, step, max_steps=40)
  new_pred = int(jnp.argmax(fn.logits(params, p["main"][None], p["main_len"][None])[0]))
  assert new_pred == 1 - pred and 0 < taken < 40


def test_evaluation_of_an_update_that_changes_nothing_and_of_one_that_flips_everything():
  _, _, fn, _, points = setup()
  chains = [[0], [1], [2, 3, 4]]  # an odd chain of negations ends negated
  preds = np.asarray(jnp.argmax(fn.logits(fn.params, points["main"], points["main_len"]), -1))
  points = {**points, "desired": 1 - preds}  # the opposite of what the model predicts, as the study sets it
  unchanged = run_chains(fn, lambda params, p: (params, 0), points, chains)["metrics"]
  assert unchanged["update_success"] == 0.0 and unchanged["retain_rate"] == 100.0
  assert unchanged["delta_accuracy"] == 0.0 and unchanged["updates"] == 5
  flip_head = lambda params, p: (jax.tree.map(lambda w: -w, params), 1)  # negated head: every prediction flips
  head_fn = Functional.split(fn.model(fn.params), nnx.All(nnx.Param, nnx.PathContains("head")))
  flipped = run_chains(head_fn, flip_head, points, chains)
  assert flipped["metrics"]["update_success"] == 100.0 and flipped["metrics"]["retain_rate"] == 0.0
  n = len(points["desired"])
  assert sorted(flipped["flips"][0]) == list(range(1, n))  # the single update of belief 0 flips every other
