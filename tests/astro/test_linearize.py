"""Linearisation of a hand-built search tree: the search trace writes each visited dead end (down to its
wrong answer or its last step), a reflection and a backtrack to the branching step (a restart at the root) in
path order, and ends at the verified answer and a check; the direct trace is the best path alone."""
import ml_collections

from astro import data as astro_data
from astro.linearize import astro_steps, backtrack_pattern, best_path, count_backtracks, direct_steps, \
    sft_examples
from astro.search import Node, Tree

PHRASES = ml_collections.ConfigDict(dict(
    seed=0, max_backtracks=5, reflect_phrases=("Wait, let me check.",), backtrack_phrases=("Go back to: {step}",),
    restart_phrases=("Start over.",), verify_phrases=("Checked.",)))


def hand_tree():
  """1+1+2: a wrong first step (dead end to a wrong answer), the right one, then a wrong and a right second."""
  tree = Tree.new(astro_data.Problem("What is 1+1+2?", "4", 2))
  specs = [  # step, parent, visits, value_sum, terminal, correct
      ("1+1=3", 0, 2, 0.0, False, False), ("1+1=2", 0, 3, 2.4, False, False), ("3+2=5", 1, 1, 0.0, False, False),
      ("2+2=4", 2, 2, 2.0, False, False), ("Answer: \\boxed{5}", 3, 1, 0.0, True, False),
      ("Answer: \\boxed{4}", 4, 1, 1.0, True, True), ("2+2=5", 2, 1, 0.0, False, False),
      ("2+2=6", 2, 0, 0.0, False, False)]  # proposed but never visited: not a dead end the search saw
  for step, parent, visits, value, terminal, correct in specs:
    tree.nodes.append(Node(step, parent, 0.5, tree.nodes[parent].depth + 1, visits=visits, value_sum=value,
                           terminal=terminal, correct=correct))
    tree.nodes[parent].children.append(len(tree.nodes) - 1)
  tree.nodes[0].visits = 5
  return tree


def test_the_search_trace_backtracks_from_each_dead_end_in_order_and_ends_at_the_verified_answer():
  assert astro_steps(hand_tree(), PHRASES, 0) == [
      "1+1=3", "3+2=5", "Answer: \\boxed{5}", "Wait, let me check.", "Start over.",
      "1+1=2",
      "2+2=5", "Wait, let me check.", "Go back to: 1+1=2",
      "2+2=4", "Answer: \\boxed{4}", "Checked."]


def test_max_backtracks_keeps_the_first_dead_ends_along_the_path():
  assert astro_steps(hand_tree(), ml_collections.ConfigDict({**PHRASES.to_dict(), "max_backtracks": 1}), 0) == [
      "1+1=3", "3+2=5", "Answer: \\boxed{5}", "Wait, let me check.", "Start over.",
      "1+1=2", "2+2=4", "Answer: \\boxed{4}", "Checked."]


def test_the_direct_trace_is_the_best_path():
  tree = hand_tree()
  assert best_path(tree) == [0, 2, 4, 6]
  assert direct_steps(tree) == ["1+1=2", "2+2=4", "Answer: \\boxed{4}"]


def test_examples_verify_and_count_their_backtracks():
  tree = hand_tree()
  unsolved = Tree.new(astro_data.Problem("x", "1", 1))
  [astro], [direct] = sft_examples([tree, unsolved], PHRASES, "astro"), sft_examples([tree, unsolved], PHRASES,
                                                                                     "direct")
  assert astro["prompt"] == direct["prompt"] == "Q: What is 1+1+2?\n"
  assert direct["response"] == "1+1=2\n2+2=4\nAnswer: \\boxed{4}"
  assert astro_data.verify(tree.problem, astro["response"]) and astro_data.verify(tree.problem, direct["response"])
  assert count_backtracks(astro["response"], backtrack_pattern(PHRASES)) == 2
  assert count_backtracks(direct["response"], backtrack_pattern(PHRASES)) == 0


def test_a_verified_rollout_finishes_a_path_that_stops_above_the_answer():
  tree = hand_tree()
  tree.nodes[6].correct = False  # the answer step is gone: only the rollout from 2+2=4 was verified
  tree.nodes[6].leaf_value = 0.0
  tree.nodes[4].children = []
  tree.nodes[4].solution = "Answer: \\boxed{4}\n"
  assert best_path(tree) == [0, 2, 4]
  assert direct_steps(tree) == ["1+1=2", "2+2=4", "Answer: \\boxed{4}"]
  assert astro_steps(tree, PHRASES, 0)[-2:] == ["Answer: \\boxed{4}", "Checked."]
