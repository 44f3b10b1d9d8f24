"""The layer picture of docs/architecture.md, checked on the code: every module's imports (parsed with `ast`,
imports inside functions included) point only at its own layer or a lower floor, protocols/ never imports train/,
and no module imports itself back through others (no cycles). A module in no layer fails: a new package or
top-level module needs its floor in the table (here and in the docs)."""

import ast
import re

from conftest import REPO

PACKAGE = REPO / "meddiff_jax"
# Bottom to top (docs/architecture.md, "Layers"). A layer is a subpackage or a top-level module of meddiff_jax
# (`__init__`: the package's own __init__.py); it may import itself and every layer on a lower floor.
FLOORS = (
  ("sections", "storage"),
  ("models",),
  ("diffusion", "data"),
  ("evaluation", "configs"),
  ("checkpoint", "sharding", "config_files"),
  ("pretrained",),
  ("train", "tasks"),
  ("protocols",),
  ("checks",),
  ("main", "api"),
  ("__init__",),  # re-exports the API (imported on first use)
)
NEVER = {("protocols", "train")}  # the evaluate command runs tasks through their run(config); it trains nothing
FLOOR = {layer: floor for floor, layers in enumerate(FLOORS) for layer in layers}


def module_files() -> dict[str, object]:
  """'meddiff_jax.data.volumes' -> its path, for every module of the package."""
  out = {}
  # configs/ is a link into the package (meddiff_jax.configs), which rglob does not follow
  for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE / "configs").glob("*.py")]):
    parts = path.relative_to(REPO).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def layer_of(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(module: str, path, modules: dict) -> set[str]:
  """The package modules `module` imports (`from meddiff_jax.data import volumes` -> meddiff_jax.data.volumes)."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from . import x / from ..data import y
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
  return {m for m in out if m in modules and m != module}


def import_graph() -> dict[str, set[str]]:
  modules = module_files()
  return {m: imported_modules(m, path, modules) for m, path in modules.items()}


def test_every_module_has_a_floor():
  unplaced = sorted(m for m in import_graph() if layer_of(m) not in FLOOR)
  assert not unplaced, f"modules in no layer (add them to FLOORS and docs/architecture.md): {unplaced}"


def violations(graph: dict[str, set[str]]) -> list[str]:
  bad = []
  for module, imports in graph.items():
    src = layer_of(module)
    for target in sorted(imports):
      dst = layer_of(target)
      if src not in FLOOR or dst not in FLOOR:  # test_every_module_has_a_floor names them
        continue
      if dst != src and (FLOOR[dst] >= FLOOR[src] or (src, dst) in NEVER):
        bad.append(f"{module} (floor {FLOOR[src]}) imports {target} (floor {FLOOR[dst]})")
  return bad


def cycles(graph: dict[str, set[str]]) -> list[str]:
  """Each import cycle found by a depth-first walk, as 'a -> b -> a'."""
  state, found = {}, []

  def visit(module, stack):
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        found.append(" -> ".join(stack[stack.index(target) :] + [target]))
      elif target not in state:
        visit(target, stack)
    stack.pop()
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [])
  return found


def test_imports_point_down_only():
  bad = violations(import_graph())
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  found = cycles(import_graph())
  assert not found, "\n".join(found)


def test_the_checks_see_violations_and_cycles(tmp_path):
  """The parser resolves `from pkg import module`, relative and function-level imports, and both checks fire
  (else the tests above would pass on code they cannot read)."""
  (tmp_path / "meddiff_jax" / "data").mkdir(parents=True)
  (tmp_path / "meddiff_jax" / "data" / "a.py").write_text("def f():\n  from . import b\n")
  (tmp_path / "meddiff_jax" / "data" / "b.py").write_text("from meddiff_jax.data import a\nimport meddiff_jax.train\n")
  modules = {"meddiff_jax.data.a": 0, "meddiff_jax.data.b": 0, "meddiff_jax.train": 0}
  graph = {m: imported_modules(m, tmp_path / (m.replace(".", "/") + ".py"), modules) for m in modules if "data" in m}
  assert graph == {
    "meddiff_jax.data.a": {"meddiff_jax.data.b"},
    "meddiff_jax.data.b": {"meddiff_jax.data.a", "meddiff_jax.train"},
  }
  assert violations(graph) == ["meddiff_jax.data.b (floor 2) imports meddiff_jax.train (floor 6)"]
  assert cycles(graph) == ["meddiff_jax.data.a -> meddiff_jax.data.b -> meddiff_jax.data.a"]
  assert violations(
    {"meddiff_jax.protocols.x": {"meddiff_jax.train.loop"}, "meddiff_jax.tasks.y": {"meddiff_jax.train.z"}}
  ) == [
    "meddiff_jax.protocols.x (floor 7) imports meddiff_jax.train.loop (floor 6)",
    "meddiff_jax.tasks.y (floor 6) imports meddiff_jax.train.z (floor 6)",
  ]


def test_docs_table_is_this_table():
  """docs/architecture.md's floor table lists exactly FLOORS (same floors, same layers)."""
  rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", (REPO / "docs" / "architecture.md").read_text(), re.M)
  assert rows, "docs/architecture.md has no floor table"
  documented = {
    int(floor): {name.rstrip("/").removesuffix(".py") for name in re.findall(r"`([^`]+)`", layers)}
    for floor, layers in rows
  }
  assert documented == {floor: set(layers) for floor, layers in enumerate(FLOORS)}


def test_importing_every_module_starts_no_jax_backend():
  """jax.distributed.initialize() must come before the backend starts; a jax array made at import time (a
  module-level jnp constant) starts it, and every multi-process run then fails at start-up. In a fresh process,
  as `python -m meddiff_jax.main` starts."""
  import subprocess
  import sys

  code = (
    "import importlib, pkgutil, meddiff_jax\n"
    "for m in pkgutil.walk_packages(meddiff_jax.__path__, 'meddiff_jax.'):\n"
    "  if '.configs' not in m.name: importlib.import_module(m.name)\n"
    "from jax._src import xla_bridge\n"
    "assert not xla_bridge.backends_are_initialized()\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
