"""Search trees to chains of thought (Kim et al. 2025, section 2.2): the procedure cloning that teaches a model to
search in context. From each tree, the best path (the child of highest value that leads to a verified answer, at
every node; the last stretch may be a verified rollout) is walked from the root; at a node where the search also
visited a branch that never reached a verified answer, that dead end is written out first (its most visited
steps, down to its answer or its last expanded step), followed by a self-reflection and a backtrack to the node
("... let me go back to: <step>", or "start over" at the root); the trace ends at the verified answer and a last
check of it. The direct trace of the same tree, the control, is the best path's steps alone.

Phrasings come from `linearize.*` (one drawn per reflection, by a rng of (linearize.seed, problem index));
`linearize.max_backtracks` caps the dead ends per trace, taken in order along the path.
"""
from __future__ import annotations

import re

import numpy as np

from astro import data as astro_data
from astro.search import Tree


def solved(tree: Tree, index: int) -> bool:
  """Whether a verified answer lies below the node: a right answer step, or a rollout the verifier accepted."""
  node = tree.nodes[index]
  return node.correct or bool(node.solution) or any(solved(tree, c) for c in node.children)


def best_path(tree: Tree) -> list[int] | None:
  """Node indices from the root to a verified answer, by the highest Q (then visits) among the children that
  lead to one; it ends at a right answer step, or at a node whose verified rollout finishes it (when no child
  of it leads further); None when the search found no verified answer."""
  if not solved(tree, 0):
    return None
  path = [0]
  while not tree.nodes[path[-1]].correct:
    options = [c for c in tree.nodes[path[-1]].children if solved(tree, c)]
    if not options:
      break
    path.append(max(options, key=lambda c: (tree.nodes[c].q, tree.nodes[c].visits, -c)))
  return path


def _finish(tree: Tree, path: list[int]) -> list[str]:
  """The steps of a verified rollout that completes a path ending above the answer ([] if it ends there)."""
  last = tree.nodes[path[-1]]
  if last.correct:
    return []
  return [line.strip() for line in last.solution.split(astro_data.DELIMITER) if line.strip()]


def dead_end(tree: Tree, index: int) -> list[int]:
  """A failed branch as the search saw it: from `index` down by the most visited child (the first on ties)."""
  branch = [index]
  while tree.nodes[branch[-1]].children:
    branch.append(max(tree.nodes[branch[-1]].children, key=lambda c: (tree.nodes[c].visits, -c)))
  return branch


def astro_steps(tree: Tree, cfg, problem_index: int) -> list[str] | None:
  """The lines of the search trace (dead ends, reflections, backtracks, the verified answer)."""
  path = best_path(tree)
  if path is None:
    return None
  rng = np.random.default_rng((int(cfg.seed), problem_index))
  pick = lambda phrases: str(phrases[int(rng.integers(len(phrases)))])
  lines, left = [], int(cfg.max_backtracks)
  for depth, (node, chosen) in enumerate(zip(path, path[1:])):
    failed = [c for c in tree.nodes[node].children if c != chosen and tree.nodes[c].visits and not solved(tree, c)]
    for start in failed[:left]:
      lines += [tree.nodes[i].step for i in dead_end(tree, start)]
      back = pick(cfg.restart_phrases) if depth == 0 else pick(cfg.backtrack_phrases).format(
          step=tree.nodes[node].step)
      lines += [pick(cfg.reflect_phrases), back]
      left -= 1
    lines.append(tree.nodes[chosen].step)
  return lines + _finish(tree, path) + [pick(cfg.verify_phrases)]


def direct_steps(tree: Tree) -> list[str] | None:
  path = best_path(tree)
  return None if path is None else [tree.nodes[i].step for i in path[1:]] + _finish(tree, path)


def sft_examples(trees: list[Tree], cfg, trace: str) -> list[dict]:
  """{prompt, response} per tree with a verified answer: `trace` 'astro' (search trace) or 'direct'."""
  out = []
  for index, tree in enumerate(trees):
    steps = astro_steps(tree, cfg, index) if trace == "astro" else direct_steps(tree)
    if steps is not None:
      out.append(dict(prompt=astro_data.prompt_of(tree.problem), response=astro_data.solution_text(steps)))
  return out


def backtrack_pattern(cfg) -> re.Pattern:
  """Matches each backtrack or restart a generation writes (the phrasings' text before any '{step}')."""
  heads = [p.split("{step}")[0].strip() for p in (*cfg.backtrack_phrases, *cfg.restart_phrases)]
  return re.compile("|".join(re.escape(h) for h in sorted(set(heads), key=len, reverse=True) if h))


def count_backtracks(text: str, pattern: re.Pattern) -> int:
  return len(pattern.findall(text))
