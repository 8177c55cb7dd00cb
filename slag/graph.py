"""Belief graphs (Hase et al. 2023): one node per belief, an edge A -> B when updating A (alone,
from the base model) flips the prediction on B. Their statistics say how entangled a model's beliefs are:
how many beliefs one update changes (out-degree), how many updates reach a belief (in-degree), how far
changes travel (shortest paths), and how many beliefs an update corrupts (right before, wrong after)."""
from __future__ import annotations

import networkx as nx
import numpy as np
from matplotlib.figure import Figure


def belief_graph(num_beliefs: int, flips: dict[int, list[int]]) -> nx.DiGraph:
  """`flips[a]`: the beliefs whose prediction updating belief a changed (a itself is never an edge)."""
  graph = nx.DiGraph()
  graph.add_nodes_from(range(num_beliefs))
  graph.add_edges_from((a, b) for a, targets in flips.items() for b in targets if a != b)
  return graph


def graph_stats(graph: nx.DiGraph, corrupted: dict[int, int] | None = None,
                updated: list[int] | None = None) -> dict:
  """Degrees, paths and components of a belief graph; `corrupted[a]`: beliefs updating a made wrong;
  `updated`: the beliefs that were updated (default all), over which out-degrees are counted."""
  sources = list(graph.nodes) if updated is None else updated
  out_deg = np.array([graph.out_degree(a) for a in sources], dtype=float)
  in_deg = np.array([d for _, d in graph.in_degree()], dtype=float)
  lengths = [d for _, targets in nx.shortest_path_length(graph) for t, d in targets.items() if d > 0]
  n = max(graph.number_of_nodes(), 1)
  stats = dict(
      nodes=graph.number_of_nodes(), edges=graph.number_of_edges(),
      mean_out_degree=float(out_deg.mean()) if out_deg.size else 0.0,
      max_out_degree=int(out_deg.max()) if out_deg.size else 0,
      max_in_degree=int(in_deg.max()) if in_deg.size else 0,
      share_updates_flipping_any=float(np.mean(out_deg > 0)) if out_deg.size else 0.0,
      share_beliefs_ever_flipped=float(np.mean(in_deg > 0)) if in_deg.size else 0.0,
      reachable_pairs=len(lengths), mean_path_length=float(np.mean(lengths)) if lengths else 0.0,
      max_path_length=int(max(lengths)) if lengths else 0,
      weak_components=nx.number_weakly_connected_components(graph),
      out_degree_histogram=np.bincount(out_deg.astype(int)).tolist() if out_deg.size else [],
      in_degree_histogram=np.bincount(in_deg.astype(int)).tolist() if in_deg.size else [],
      density=graph.number_of_edges() / (n * (n - 1)) if n > 1 else 0.0,
  )
  if corrupted is not None:
    values = np.array(list(corrupted.values()), dtype=float)
    stats.update(mean_corrupted_per_update=float(values.mean()) if values.size else 0.0,
                 max_corrupted_per_update=int(values.max()) if values.size else 0)
  return stats


def plot_graphs(graphs: dict[str, nx.DiGraph], path: str, seed: int = 0) -> str:
  """One row per method: the belief graph (nodes sized by out-degree) and its out-degree histogram."""
  fig = Figure(figsize=(10, 4 * max(1, len(graphs))))
  for row, (title, graph) in enumerate(graphs.items()):
    ax = fig.add_subplot(len(graphs), 2, 2 * row + 1)
    pos = nx.spring_layout(graph, seed=seed)
    sizes = [12 + 8 * d for _, d in graph.out_degree()]
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_size=sizes, node_color="C0", alpha=0.8)
    nx.draw_networkx_edges(graph, pos, ax=ax, alpha=0.25, arrowsize=5, width=0.6)
    ax.set_title(f"{title}: {graph.number_of_nodes()} beliefs, {graph.number_of_edges()} edges", fontsize=9)
    ax.set_axis_off()
    hist = fig.add_subplot(len(graphs), 2, 2 * row + 2)
    degrees = [d for _, d in graph.out_degree()]
    hist.hist(degrees, bins=range(0, max(degrees, default=0) + 2), color="C1")
    hist.set(xlabel="beliefs flipped by one update (out-degree)", ylabel="updates", yscale="log")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path
