"""`python -m astro.search --config=astro/configs/tiny.py --config.init_run=BASE_RUN --out=DIR [--config.KEY=VALUE]`

Step-level Monte Carlo tree search (Kim et al. 2025, section 2.1). A node is a problem with the solution steps
so far; expanding a leaf samples `search.k` next steps from the policy (one generation per step, stopped at
the step delimiter, all leaves of a batch of trees in one batched KV-cached call of `common.generate`);
identical samples merge, and a child's prior pi(a|s) is the share of the k samples that proposed it. A new
child is valued by the verifier when its step states an answer, else by the mean reward of `search.rollouts`
completions from it (1 when the final answer is right, 0 otherwise; a right one is kept with the node, a
verified way to finish from there). Selection descends by PUCT,

    Q(s, a) + c * pi(a|s) * sqrt(N(s)) / (1 + N(s, a)),

to a leaf; after an expansion every node on the path gains one visit and the mean value of the new children
(the backup of mean values). Leaves that state an answer or reach `search.max_depth` are not expanded: their
value is backed up again when selected.

The policy is the `init_run` (the base stage's workdir) or the hub entry `model.init_from`; the problems are
the first `search.num_problems` training problems (astro/data.py). Trees are searched in batches of
`search.batch_problems`, each written atomically as DIR/trees/NNNNN.json when its batch ends; a rerun skips
the batches whose trees exist, and each batch draws from (seed, batch, iteration) alone, so a killed search
continues with exactly the trees an uninterrupted one makes. DIR/search.json records the settings; a rerun
with other settings is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Protocol, Sequence

from etils import epath

from common.config import ConfigError, parse_argv, require, run_main
from common.generate import generate
from common.tokenizers import Tokenizer
from common.train.workdir import write_atomic

from astro import data as astro_data
from astro import model as astro_model

SEARCH_KEYS = ("k", "rollouts", "iterations", "max_depth", "c_puct", "temperature", "max_step_tokens",
               "max_rollout_tokens", "num_problems", "batch_problems")


@dataclasses.dataclass
class Node:
  step: str          # the step that led here ('' at the root)
  parent: int        # index of the parent in Tree.nodes (-1 at the root)
  prior: float       # pi(a|s): the share of the parent's k samples that proposed this step
  depth: int         # steps from the root
  children: list[int] = dataclasses.field(default_factory=list)
  visits: int = 0
  value_sum: float = 0.0
  leaf_value: float = 0.0  # the value it was created with (rollouts or the verifier)
  terminal: bool = False   # the step states a final answer
  correct: bool = False    # ... and the verifier accepts it
  solution: str = ""       # the first of its rollouts the verifier accepted (the rest of a verified solution)

  @property
  def q(self) -> float:
    return self.value_sum / self.visits if self.visits else 0.0


@dataclasses.dataclass
class Tree:
  problem: astro_data.Problem
  nodes: list[Node]

  @classmethod
  def new(cls, problem: astro_data.Problem) -> Tree:
    return cls(problem, [Node(step="", parent=-1, prior=1.0, depth=0)])

  def steps_to(self, index: int) -> list[str]:
    steps = []
    while index > 0:
      steps.append(self.nodes[index].step)
      index = self.nodes[index].parent
    return steps[::-1]

  def prefix(self, index: int) -> str:
    """The policy's context at a node: the prompt and the steps so far, each ending with the delimiter."""
    return astro_data.prompt_of(self.problem) + "".join(s + astro_data.DELIMITER for s in self.steps_to(index))

  def to_json(self) -> dict:
    return dict(problem=dataclasses.asdict(self.problem), nodes=[dataclasses.asdict(n) for n in self.nodes])

  @classmethod
  def from_json(cls, record: dict) -> Tree:
    p = record["problem"]
    problem = astro_data.Problem(**{**p, "steps": tuple(p["steps"])})
    return cls(problem, [Node(**n) for n in record["nodes"]])


class Policy(Protocol):
  """What the search asks of a policy: next steps and whole completions, `n` of each per prefix."""

  def propose(self, prefixes: Sequence[str], n: int, seed: int) -> list[list[str]]: ...

  def complete(self, prefixes: Sequence[str], n: int, seed: int) -> list[list[str]]: ...


def puct(tree: Tree, parent: int, child: int, c_puct: float) -> float:
  """Q(s, a) + c * pi(a|s) * sqrt(N(s)) / (1 + N(s, a))."""
  p, a = tree.nodes[parent], tree.nodes[child]
  return a.q + c_puct * a.prior * math.sqrt(p.visits) / (1 + a.visits)


def select(tree: Tree, c_puct: float) -> list[int]:
  """The path from the root to a leaf by the highest PUCT score (the first child on ties)."""
  path = [0]
  while tree.nodes[path[-1]].children:
    parent = path[-1]
    path.append(max(tree.nodes[parent].children, key=lambda c: puct(tree, parent, c, c_puct)))
  return path


def backup(tree: Tree, path: Sequence[int], value: float) -> None:
  for index in path:
    tree.nodes[index].visits += 1
    tree.nodes[index].value_sum += value


def add_children(tree: Tree, parent: int, proposals: Sequence[str]) -> list[int]:
  """Children for the distinct proposed steps, in order of first appearance, priors = their shares."""
  counts: dict[str, int] = {}
  for step in proposals:
    counts[step] = counts.get(step, 0) + 1
  made = []
  for step, count in counts.items():
    node = Node(step=step, parent=parent, prior=count / len(proposals), depth=tree.nodes[parent].depth + 1)
    node.terminal = astro_data.is_answer_step(step) or not step
    if node.terminal:
      node.correct = bool(step) and astro_data.verify(tree.problem, step)
      node.leaf_value = float(node.correct)
    tree.nodes.append(node)
    tree.nodes[parent].children.append(len(tree.nodes) - 1)
    made.append(len(tree.nodes) - 1)
  return made


def _seed(seed: int, batch: int, iteration: int, phase: int) -> int:
  return (seed * 1_000_003 + batch * 10_007 + iteration * 2 + phase) % (2**31 - 1)


def search_batch(problems: Sequence[astro_data.Problem], policy: Policy, s, *, seed: int, batch: int = 0
                 ) -> list[Tree]:
  """`s.iterations` rounds of select / expand / evaluate / backup on one tree per problem, every policy call
  batched over the trees; a pure function of (problems, policy, settings, seed, batch)."""
  trees = [Tree.new(p) for p in problems]
  for iteration in range(int(s.iterations)):
    paths = [select(t, float(s.c_puct)) for t in trees]
    growing = [i for i, (t, path) in enumerate(zip(trees, paths))
               if not t.nodes[path[-1]].terminal and t.nodes[path[-1]].depth < int(s.max_depth)]
    for i, (t, path) in enumerate(zip(trees, paths)):
      if i not in growing:  # an answer or the depth limit: its value again
        backup(t, path, t.nodes[path[-1]].leaf_value)
    if not growing:
      continue
    proposals = policy.propose([trees[i].prefix(paths[i][-1]) for i in growing], int(s.k),
                               _seed(seed, batch, iteration, 0))
    new = {i: add_children(trees[i], paths[i][-1], steps) for i, steps in zip(growing, proposals)}
    open_nodes = [(i, c) for i in growing for c in new[i] if not trees[i].nodes[c].terminal]
    if open_nodes:
      completions = policy.complete([trees[i].prefix(c) for i, c in open_nodes], int(s.rollouts),
                                    _seed(seed, batch, iteration, 1))
      for (i, c), texts in zip(open_nodes, completions):
        rewards = [astro_data.verify(trees[i].problem, text) for text in texts]
        trees[i].nodes[c].leaf_value = sum(rewards) / len(rewards)
        trees[i].nodes[c].solution = next((t.strip() for t, r in zip(texts, rewards) if r), "")
    for i in growing:
      for c in new[i]:
        trees[i].nodes[c].visits, trees[i].nodes[c].value_sum = 1, trees[i].nodes[c].leaf_value
      backup(trees[i], paths[i], sum(trees[i].nodes[c].leaf_value for c in new[i]) / len(new[i]))
  return trees


class LMPolicy:
  """The dense LM as a search policy: temperature sampling through `common.generate`, a step ending at the
  delimiter, a completion at end of sequence. Rows are padded to a multiple of `row_bucket` (copies of the
  first prompt, dropped after) so a search compiles a handful of shapes."""

  def __init__(self, model, tokenizer: Tokenizer, *, temperature: float, max_step_tokens: int,
               max_rollout_tokens: int, row_bucket: int = 32):
    self.model, self.tokenizer, self.temperature = model, tokenizer, float(temperature)
    self.max_step_tokens, self.max_rollout_tokens, self.row_bucket = max_step_tokens, max_rollout_tokens, row_bucket
    delimiter = tokenizer.encode(astro_data.DELIMITER)
    self.step_stop = dict(stop_ids=(*tokenizer.stop_ids, *delimiter)) if len(delimiter) == 1 else \
        dict(stop_ids=tokenizer.stop_ids, stop_strings=(astro_data.DELIMITER,), tokenizer=tokenizer)

  def _sample(self, prefixes, n, seed, max_new_tokens, stop) -> list[list[str]]:
    bos = self.tokenizer.bos_id is not None
    rows = [self.tokenizer.encode(p, bos=bos) for p in prefixes for _ in range(n)]
    total = -(-len(rows) // self.row_bucket) * self.row_bucket
    out = generate(self.model, rows + [rows[0]] * (total - len(rows)), max_new_tokens=max_new_tokens,
                   temperature=self.temperature, seed=seed, **{"tokenizer": self.tokenizer, **stop})
    texts = [self.tokenizer.decode(ids) for ids in out[:len(rows)]]
    return [texts[i * n:(i + 1) * n] for i in range(len(prefixes))]

  def propose(self, prefixes, n, seed):
    texts = self._sample(prefixes, n, seed, self.max_step_tokens, self.step_stop)
    return [[t.split(astro_data.DELIMITER)[0].strip() for t in row] for row in texts]

  def complete(self, prefixes, n, seed):
    return self._sample(prefixes, n, seed, self.max_rollout_tokens, dict(stop_ids=self.tokenizer.stop_ids))


def settings_of(search_cfg) -> dict:
  return {k: search_cfg[k] for k in SEARCH_KEYS}


def run_search(problems: Sequence[astro_data.Problem], policy: Policy, search_cfg, out: str, *, seed: int,
               log=print) -> list[Tree]:
  """Searches `problems` into OUT/trees (resumable, see the module docstring); all their trees."""
  out_path = epath.Path(out)
  (out_path / "trees").mkdir(parents=True, exist_ok=True)
  record = json.dumps(dict(settings_of(search_cfg), seed=seed, problems=len(problems)), sort_keys=True)
  manifest = out_path / "search.json"
  if manifest.exists() and manifest.read_text() != record:
    raise ConfigError(f"--out: '{out}' holds a search with other settings ({manifest.read_text()}); "
                      "use another folder")
  write_atomic(manifest, record)
  size = int(search_cfg.batch_problems)
  trees: list[Tree] = []
  for batch, start in enumerate(range(0, len(problems), size)):
    names = [out_path / "trees" / f"{i:05d}.json" for i in range(start, min(start + size, len(problems)))]
    if all(n.exists() for n in names):
      trees += [Tree.from_json(json.loads(n.read_text())) for n in names]
      continue
    made = search_batch(problems[start:start + size], policy, search_cfg, seed=seed, batch=batch)
    for name, tree in zip(names, made):
      write_atomic(name, json.dumps(tree.to_json()))
    trees += made
    log(f"search: {start + len(made)}/{len(problems)} trees, {sum(t.nodes[0].visits for t in made)} visits")
  return trees


def read_trees(out: str, key: str = "data.search_dir") -> list[Tree]:
  """The trees of a finished search folder (all that search.json promised)."""
  path = epath.Path(out)
  require(bool(out) and (path / "search.json").exists(), key, f"'{out}' holds no search (run python -m "
          "astro.search, or astro.reproduce, first)")
  expected = json.loads((path / "search.json").read_text())["problems"]
  names = sorted((path / "trees").glob("*.json"))
  require(len(names) == expected, key, f"'{out}' holds {len(names)} of {expected} trees: the search was "
          "interrupted; rerun it to finish")
  return [Tree.from_json(json.loads(n.read_text())) for n in names]


def check_search(s) -> None:
  for key in ("k", "rollouts", "iterations", "max_depth", "max_step_tokens", "max_rollout_tokens",
              "num_problems", "batch_problems"):
    require(int(s[key]) >= 1, f"search.{key}", f"must be >= 1, got {s[key]}")
  require(float(s.c_puct) >= 0, "search.c_puct", f"must be >= 0, got {s.c_puct}")
  require(float(s.temperature) > 0, "search.temperature", f"must be > 0 (the k samples must differ), got "
          f"{s.temperature}")


def policy_for(cfg) -> LMPolicy:
  """The LM policy of a config: its starting model (`astro.model`) with the search's sampling settings."""
  astro_model.adopt_base(cfg)
  tokenizer = astro_model.tokenizer_for(cfg)
  astro_model.check_fits(cfg, tokenizer)
  s = cfg.search
  return LMPolicy(astro_model.model_builder(cfg)(), tokenizer, temperature=float(s.temperature),
                  max_step_tokens=int(s.max_step_tokens), max_rollout_tokens=int(s.max_rollout_tokens))


def search_for(cfg, out: str, log=print) -> list[Tree]:
  """The search of a config into `out`: its training problems, its policy, `train.seed`."""
  check_search(cfg.search)
  problems = astro_data.problem_sets(cfg.data)[0][:int(cfg.search.num_problems)]
  return run_search(problems, policy_for(cfg), cfg.search, out, seed=int(cfg.train.seed), log=log)


def main(argv) -> int:
  cfg, flags = parse_argv(argv, extra_flags={"out": "folder of the search: search.json, trees/"}, workdir=False)
  if not flags.get("out"):
    raise ConfigError("missing --out=DIR")
  trees = search_for(cfg, flags["out"])
  solved = sum(any(n.correct for n in t.nodes) for t in trees)
  print(f"search: {len(trees)} trees in {flags['out']}, {solved} with a verified answer", flush=True)
  return 0


if __name__ == "__main__":
  run_main(lambda: main(sys.argv[1:]))
