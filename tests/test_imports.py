"""The import structure of the project (WORKSPACE.md, "Floors"): read from the source with `ast`, function-level
imports included, so that a lazy import cannot hide a circle or an import that points up.

- `common/` is ordered in floors; a module imports only from its own floor or the ones below.
- `common` never imports a paper package (or `bench`); a paper package never imports another.
- There is no import circle anywhere, inside a floor or a package included.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Floors of common/, lowest first: (floor, module prefixes). The longest matching prefix places a module.
FLOORS = (
    ("foundations", ("common", "common.config", "common.cli", "common.sharding", "common.distributed",
                     "common.flops", "common.tokenizers", "common.eval")),
    ("data", ("common.data", "common.configs", "common.eval.math_data", "common.eval.tasks", "common.eval.fewshot")),
    ("nn", ("common.nn", "common.kernels")),
    ("models", ("common.models", "common.generate", "common.scoring")),
    ("tasks", ("common.tasks",)),
    ("train", ("common.train",)),
    ("recipes", ("common.recipes",)),
    ("top", ("common.hub", "common.scaling", "common.plan", "common.reproduce", "common.evaluate")),
)
LEVEL = {prefix: i for i, (_, prefixes) in enumerate(FLOORS) for prefix in prefixes}
NAMES = [name for name, _ in FLOORS]


def _packages() -> list[str]:
  """Top-level packages of the project: common, the paper packages, bench."""
  return sorted(d for d in os.listdir(ROOT)
                if os.path.isfile(os.path.join(ROOT, d, "__init__.py")) and d not in ("tests",))


def _modules() -> dict[str, str]:
  out = {}
  for package in _packages():
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(folder, f)
          name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


MODULES = _modules()


def _owner(name: str) -> str | None:
  """The project module an imported name lives in (a name inside a module maps to the module)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str) -> set[str]:
  """Project modules `module` imports anywhere in its body. `from pkg import sub` counts as importing `pkg.sub`
  when that is a module, else `pkg` itself (a name taken from a package's __init__, its own ancestors included)."""
  path = MODULES[module]
  is_package = path.endswith("__init__.py")
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
      else:
        base = node.module
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    for name in names:
      target = _owner(name)
      if target and target != module:
        out.add(target)
  return out


GRAPH = {m: _imports(m) for m in MODULES}


def floor(module: str) -> int | None:
  parts = module.split(".")
  for i in range(len(parts), 0, -1):
    if ".".join(parts[:i]) in LEVEL:
      return LEVEL[".".join(parts[:i])]
  return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = 0
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          out.append(sorted(component))
  return out


def test_the_cycle_finder_finds_a_planted_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert _cycles(graph) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_there_is_no_import_circle_anywhere():
  assert _cycles(GRAPH) == []


def test_every_module_of_common_has_a_floor():
  assert [m for m in MODULES if m.split(".")[0] == "common" and floor(m) is None] == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("common")))
def test_common_imports_point_down_the_floors(module):
  up = [f"{target} ({NAMES[floor(target)]})" for target in sorted(GRAPH[module])
        if target.split(".")[0] == "common" and floor(target) > floor(module)]
  assert not up, f"{module} ({NAMES[floor(module)]}) imports from a higher floor: {up}"


def test_common_never_imports_a_paper_package_and_papers_never_import_each_other():
  wrong = []
  for module, targets in GRAPH.items():
    package = module.split(".")[0]
    for target in targets:
      other = target.split(".")[0]
      if other == package or other == "common" or package == "bench":
        continue
      wrong.append(f"{module} -> {target}")
  assert wrong == []
