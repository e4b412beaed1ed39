"""The package's import graph, read from the AST of every module.

Edges are `import conformer_fl.X` and `from conformer_fl[.P] import N` (to the
module P.N when it is one, else to P), at module level or inside functions. The
graph has no cycle, and only conformer_fl/main.py imports conformer_fl/train.py:
library code (models/, data/, federated/, analysis/, experiment/, steps,
optimizers, ...), benchmarks/ and the notebooks in colabs/ never do.

Run as a script, it prints the graph's edges and its cycles (none).
"""

import ast
import json
import pathlib
import sys

from IPython.core import inputtransformer2

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "conformer_fl"
TRAIN = f"{PACKAGE}.train"
# Only the entry point runs the loops by mode (tests import them directly).
MAY_IMPORT_TRAIN = {f"{PACKAGE}.main"}


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def package_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  """{dotted name: file} of every module of the package under `root`."""
  return {_module_name(p, root): p
          for p in sorted((root / PACKAGE).rglob("*.py"))}


def imported_modules(tree: ast.AST, modules: set[str],
                     package: str = "") -> set[str]:
  """The package modules a parsed source imports (anywhere in it).

  Args:
    tree: the parsed source.
    modules: the dotted names of the package's modules.
    package: the package relative imports start from (the module's own
      package; for an __init__.py the package itself).
  """
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(filter(None, [*parts, base]))
      for alias in node.names:
        child = f"{base}.{alias.name}"
        found.add(child if child in modules else base)
  return found & modules


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
  """{module: the package modules it imports} of the package under `root`."""
  files = package_modules(root)
  names = set(files)
  graph = {}
  for name, path in files.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    graph[name] = imported_modules(ast.parse(path.read_text()), names,
                                   package) - {name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle through each strongly connected component that has one."""
  index, low, on_stack, stack, found = {}, {}, set(), [], []

  def visit(node):  # Tarjan's algorithm.
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for other in sorted(graph.get(node, ())):
      if other not in index:
        visit(other)
        low[node] = min(low[node], low[other])
      elif other in on_stack:
        low[node] = min(low[node], index[other])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def _notebook_sources(path: pathlib.Path) -> list[str]:
  """The code cells of a notebook, as Python (IPython magics transformed)."""
  cells = json.loads(path.read_text())["cells"]
  transformer = inputtransformer2.TransformerManager()
  return [transformer.transform_cell("".join(c["source"]))
          for c in cells if c["cell_type"] == "code"]


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert f"{PACKAGE}.experiment.run" in graph
  assert cycles(graph) == []


def test_only_main_imports_train():
  graph = import_graph()
  importers = {m for m, imported in graph.items() if TRAIN in imported}
  assert importers == MAY_IMPORT_TRAIN


def test_multihost_imports_no_federated_module():
  # multihost is the lower layer: federated/mesh.py reads its timeout.
  graph = import_graph()
  assert f"{PACKAGE}.multihost" in graph[f"{PACKAGE}.federated.mesh"]
  assert not {m for m in graph[f"{PACKAGE}.multihost"]
              if m.startswith(f"{PACKAGE}.federated")}


def test_benchmarks_and_notebooks_do_not_import_train():
  modules = set(package_modules())
  sources = {p.name: [p.read_text()]
             for p in sorted((ROOT / "benchmarks").glob("*.py"))}
  sources.update({p.name: _notebook_sources(p)
                  for p in sorted((ROOT / "colabs").glob("*.ipynb"))})
  assert any(name.endswith(".ipynb") for name in sources)
  for name, texts in sources.items():
    for text in texts:
      assert TRAIN not in imported_modules(ast.parse(text), modules), name


def test_the_check_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  tree = ast.parse("def f():\n  from conformer_fl import train\n")
  assert imported_modules(tree, {TRAIN, PACKAGE}) == {TRAIN}


if __name__ == "__main__":
  root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
  graph = import_graph(root)
  for module, imported in sorted(graph.items()):
    print(f"{module} -> {', '.join(sorted(imported)) or '-'}")
  print(f"{len(graph)} modules, {sum(map(len, graph.values()))} edges;"
        f" cycles: {cycles(graph) or 'none'}")
  print("modules importing conformer_fl.train:",
        sorted(m for m, i in graph.items() if TRAIN in i))
