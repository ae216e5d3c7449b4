"""The package's shape, read from its source with `ast`: no import cycle
among its modules (imports inside functions counted), no function over 60
lines in the package or its scripts."""

import ast
import os

import pytest

import nanodo_sam

PACKAGE = os.path.dirname(os.path.abspath(nanodo_sam.__file__))
SCRIPTS = os.path.join(os.path.dirname(PACKAGE), "scripts")
MAX_LINES = 60


def _modules(folder: str = PACKAGE) -> dict[str, ast.Module]:
  """{module name: its syntax tree} for every FOLDER/*.py (nanodo_sam)."""
  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".py"):
      with open(os.path.join(folder, name)) as f:
        out[name[:-3]] = ast.parse(f.read(), filename=name)
  return out


def _imports(tree: ast.Module, names: set[str]) -> set[str]:
  """The package modules `tree` imports, at any depth (inside functions
  too): `import nanodo_sam.x`, `from nanodo_sam import x`, `from
  nanodo_sam.x import y`."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "nanodo_sam" and len(parts) > 1:
          out.add(parts[1])
    elif isinstance(node, ast.ImportFrom) and node.module:
      parts = node.module.split(".")
      if parts[0] != "nanodo_sam" or node.level:
        continue
      if len(parts) > 1:
        out.add(parts[1])
      else:
        out.update(a.name for a in node.names if a.name in names)
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  names = set(modules)
  return {
      name: _imports(tree, names) - {"__init__"}
      for name, tree in modules.items()
  }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        return stack[stack.index(dep) :] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_graph_sees_imports_at_any_depth():
  graph = _graph()
  assert len(graph) >= 20
  assert "errors" in graph["config"]  # at the top
  assert "commands" in graph["cli"]  # inside main
  assert "train" in graph["commands"]  # inside cmd_train


def test_the_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
  cycle = _cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Below the training loop: they see the model only through the logits_fn,
# head and state they are given (docs/architecture.md, "Data flow").
BELOW_THE_LOOP = (
    "loss",
    "sam",
    "sam_schedule",
    "sharpness",
    "evaluate",
    "diagnostics",
    "sharding",
    "optimizer",
    "data",
)
ABOVE = {"model", "state", "train", "commands", "cli"}


def test_layers_point_one_way():
  """docs/architecture.md's layering claims, each checked."""
  graph = _graph()
  for name in BELOW_THE_LOOP:
    assert not graph[name] & ABOVE, (name, graph[name] & ABOVE)
  assert graph["checkpoint"] & ABOVE == {"state"}  # restore_run's Setup
  assert graph["writers"] & ABOVE == set()
  assert graph["writers"] & {"flops"} == {"flops"}
  assert [m for m in graph if "cli" in graph[m]] == []
  assert [m for m in graph if "commands" in graph[m]] == ["cli"]
  scripts = {
      name: _imports(tree, set(graph))
      for name, tree in _modules(SCRIPTS).items()
  }
  assert "commands" in scripts["miniature"]  # On top of the commands.
  for name, imported in scripts.items():
    assert "cli" not in imported, name


def _long_functions(folder: str) -> list[str]:
  out = []
  for name, tree in _modules(folder).items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_LINES:
          where = os.path.basename(folder)
          out.append(f"{where}/{name}.py:{node.lineno} {node.name} ({n} lines)")
  return out


def test_the_length_check_sees_the_scripts():
  scripts = _modules(SCRIPTS)
  assert "miniature" in scripts and "analyze_memory" in scripts
  long = ast.parse("def f():\n" + "  x = 1\n" * MAX_LINES)
  assert (long.body[0].end_lineno - long.body[0].lineno + 1) > MAX_LINES


@pytest.mark.parametrize(
    "folder", [PACKAGE, SCRIPTS], ids=["package", "scripts"]
)
def test_no_function_over_60_lines(folder):
  long = _long_functions(folder)
  assert (
      not long
  ), f"{len(long)} functions over {MAX_LINES} lines: " + "; ".join(long)


def test_the_architecture_page_names_every_module_and_test_file():
  """docs/architecture.md's map lists each module (nanodo_sam/NAME.py) and
  its tests table each test file, so a newcomer finds both from the page."""
  root = os.path.dirname(PACKAGE)
  with open(os.path.join(root, "docs", "architecture.md")) as f:
    page = f.read()
  modules = [m for m in _modules() if m != "__init__"]
  tests = sorted(
      n[:-3]
      for n in os.listdir(os.path.join(root, "tests"))
      if n.startswith("test_") and n.endswith(".py")
  )
  assert len(modules) > 40 and len(tests) > 30
  missing = [f"nanodo_sam/{m}.py" for m in modules]
  missing = [m for m in missing if m not in page]
  missing += [t for t in tests if t not in page]
  assert not missing, missing
