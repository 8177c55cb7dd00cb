"""Step-level MCTS as specified: PUCT scores and the backup of mean values on a hand-computed tree, a search
with a fake policy and verifier that finds the one path to the right answer, and a search killed part-way
that a rerun completes with the trees of an uninterrupted one."""
import json
import math

import ml_collections
import numpy as np
import pytest

from astro import data as astro_data
from astro.linearize import best_path
from astro.search import Node, Tree, backup, puct, read_trees, run_search, search_batch, select

TOY = astro_data.Problem("toy", "3", 1)
# The toy's policy: next steps offered at each prefix (steps so far); only a -> b -> \boxed{3} is right.
OFFERS = {(): ["a", "x", "a"], ("a",): ["b", "b", "y"], ("x",): ["Answer: \\boxed{5}"] * 3,
          ("a", "b"): ["Answer: \\boxed{3}", "Answer: \\boxed{4}", "Answer: \\boxed{3}"],
          ("a", "y"): ["Answer: \\boxed{4}"] * 3}


def steps_of(prefix):
  return tuple(prefix.split(astro_data.DELIMITER)[1:-1])


class ToyPolicy:
  """Offers OFFERS in a seeded random order; a completion is right only from the a -> b path."""

  def __init__(self, die_after_calls=None):
    self.calls, self.die_after_calls = 0, die_after_calls

  def _tick(self):
    self.calls += 1
    if self.die_after_calls is not None and self.calls > self.die_after_calls:
      raise KeyboardInterrupt("killed")

  def propose(self, prefixes, n, seed):
    self._tick()
    rng = np.random.default_rng(seed)
    return [[OFFERS[steps_of(p)][int(i)] for i in rng.integers(0, 3, size=n)] for p in prefixes]

  def complete(self, prefixes, n, seed):
    self._tick()
    right = lambda p: steps_of(p)[:2] in (("a",), ("a", "b"))
    return [["b\nAnswer: \\boxed{3}" if right(p) else "Answer: \\boxed{7}"] * n for p in prefixes]


def settings(**over):
  return ml_collections.ConfigDict(dict(dict(k=3, rollouts=2, iterations=6, max_depth=4, c_puct=1.0, temperature=1.0,
                                             max_step_tokens=8, max_rollout_tokens=8, num_problems=4,
                                             batch_problems=2), **over))


def hand_tree():
  tree = Tree.new(TOY)
  tree.nodes[0].visits = 4
  tree.nodes += [Node("a", 0, 0.5, 1, visits=3, value_sum=1.5), Node("x", 0, 0.5, 1, visits=1, value_sum=0.0)]
  tree.nodes[0].children = [1, 2]
  return tree


def test_puct_scores_q_plus_the_prior_bonus():
  tree = hand_tree()
  assert puct(tree, 0, 1, 1.0) == pytest.approx(0.5 + 0.5 * math.sqrt(4) / 4)  # 0.75
  assert puct(tree, 0, 2, 1.0) == pytest.approx(0.0 + 0.5 * math.sqrt(4) / 2)  # 0.5
  assert select(tree, 1.0) == [0, 1]
  assert select(tree, 3.0) == [0, 2]  # exploration: 0.5 + 1.5 * 0.25 < 1.5 * 0.5


def test_backup_adds_a_visit_and_the_value_to_every_node_on_the_path():
  tree = hand_tree()
  backup(tree, [0, 2], 0.6)
  assert (tree.nodes[0].visits, tree.nodes[0].value_sum) == (5, pytest.approx(0.6))
  assert (tree.nodes[2].visits, tree.nodes[2].q) == (2, pytest.approx(0.3))
  assert (tree.nodes[1].visits, tree.nodes[1].q) == (3, 0.5)


def test_one_expansion_merges_samples_into_priors_and_backs_up_their_mean_value():
  class Fixed(ToyPolicy):
    def propose(self, prefixes, n, seed):
      return [OFFERS[steps_of(p)] for p in prefixes]
  [tree] = search_batch([TOY], Fixed(), settings(iterations=1), seed=0)
  a, x = tree.nodes[1], tree.nodes[2]
  assert (a.step, a.prior, a.leaf_value) == ("a", pytest.approx(2 / 3), 1.0)
  assert (x.step, x.prior, x.leaf_value) == ("x", pytest.approx(1 / 3), 0.0)
  assert (tree.nodes[0].visits, tree.nodes[0].q) == (1, pytest.approx(0.5))


def test_the_search_finds_the_only_path_to_the_verified_answer():
  [tree] = search_batch([TOY], ToyPolicy(), settings(iterations=8), seed=0)
  path = best_path(tree)
  assert [tree.nodes[i].step for i in path[1:]] == ["a", "b", "Answer: \\boxed{3}"]
  assert tree.nodes[path[-1]].correct
  dead_ends = [n for n in tree.nodes if n.step in ("x", "y")]
  assert dead_ends and all(n.leaf_value == 0.0 and n.visits == 1 for n in dead_ends)  # tried once, valued 0
  assert tree.nodes[0].visits == 8


def test_a_killed_search_resumes_to_the_trees_of_an_uninterrupted_one(tmp_path):
  problems = [astro_data.Problem("toy", "3", 1)] * 4
  counter = ToyPolicy()
  whole = run_search(problems, counter, settings(), str(tmp_path / "whole"), seed=3, log=lambda _: None)
  first_batch = ToyPolicy()
  search_batch(problems[:2], first_batch, settings(), seed=3, batch=0)
  with pytest.raises(KeyboardInterrupt):  # dies inside the second batch of two problems
    run_search(problems, ToyPolicy(die_after_calls=first_batch.calls + 1), settings(), str(tmp_path / "resumed"),
               seed=3, log=lambda _: None)
  assert len(list((tmp_path / "resumed" / "trees").glob("*.json"))) == 2
  with pytest.raises(Exception, match="2 of 4 trees"):
    read_trees(str(tmp_path / "resumed"))
  policy = ToyPolicy()
  run_search(problems, policy, settings(), str(tmp_path / "resumed"), seed=3, log=lambda _: None)
  assert policy.calls == counter.calls - first_batch.calls  # the finished batch was read back, not searched
  as_json = lambda trees: [json.dumps(t.to_json(), sort_keys=True) for t in trees]
  assert as_json(read_trees(str(tmp_path / "resumed"))) == as_json(whole)
  assert len({json.dumps(t.to_json()) for t in whole[:2]}) == 2  # the batches' draws differ by batch


def test_a_rerun_with_other_settings_is_refused(tmp_path):
  problems = [TOY] * 2
  run_search(problems, ToyPolicy(), settings(), str(tmp_path), seed=0, log=lambda _: None)
  with pytest.raises(Exception, match="other settings"):
    run_search(problems, ToyPolicy(), settings(k=2), str(tmp_path), seed=0, log=lambda _: None)
