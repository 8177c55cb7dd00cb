"""Belief-graph statistics on a graph small enough to count by hand."""
import networkx as nx
import pytest

from slag.graph import belief_graph, graph_stats, plot_graphs


def test_statistics_of_a_hand_built_belief_graph():
  # 0 -> 1 -> 2, 0 -> 2, and 3 alone; updating 1 also "flips" 1 itself, which is not an edge
  graph = belief_graph(4, {0: [1, 2], 1: [1, 2], 2: [], 3: []})
  assert sorted(graph.edges()) == [(0, 1), (0, 2), (1, 2)]
  stats = graph_stats(graph, corrupted={0: 2, 1: 0, 2: 0, 3: 1})
  assert stats["edges"] == 3 and stats["nodes"] == 4
  assert stats["mean_out_degree"] == pytest.approx(0.75)
  assert stats["max_out_degree"] == 2 and stats["max_in_degree"] == 2
  assert stats["share_updates_flipping_any"] == pytest.approx(0.5)
  assert stats["share_beliefs_ever_flipped"] == pytest.approx(0.5)
  # reachable pairs: 0->1 (1), 0->2 (1), 1->2 (1)
  assert stats["reachable_pairs"] == 3 and stats["mean_path_length"] == pytest.approx(1.0)
  assert stats["weak_components"] == 2
  assert stats["out_degree_histogram"] == [2, 1, 1]
  assert stats["mean_corrupted_per_update"] == pytest.approx(0.75) and stats["max_corrupted_per_update"] == 2


def test_out_degrees_count_only_the_beliefs_that_were_updated():
  stats = graph_stats(belief_graph(4, {0: [1, 2]}), updated=[0])
  assert stats["share_updates_flipping_any"] == pytest.approx(1.0) and stats["mean_out_degree"] == pytest.approx(2.0)


def test_paths_longer_than_one_edge_are_measured():
  stats = graph_stats(belief_graph(3, {0: [1], 1: [2]}))
  assert stats["max_path_length"] == 2 and stats["mean_path_length"] == pytest.approx(4 / 3)


def test_the_plot_is_written(tmp_path):
  path = plot_graphs({"a": nx.DiGraph([(0, 1)])}, str(tmp_path / "g.png"))
  assert (tmp_path / "g.png").stat().st_size > 0 and path.endswith("g.png")
