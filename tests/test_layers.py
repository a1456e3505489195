"""The package's imports run downward only: utils at the bottom, pipeline and kaggle at the top.

Every ``import`` and ``from ... import`` of ``neuroseg`` modules (at module level or inside a
function: a lazy import is still a dependency) is read with ``ast``; a test fails naming the edge
that goes up the layer order or closes a cycle.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "neuroseg"

# lower number = lower layer; a module may import its own layer (without a cycle) or lower ones
LAYERS: dict[str, int] = {
    "utils": 0,
    "structures": 1,
    "config": 2, "paths": 2, "args": 2,
    "data": 3,
    "evaluation": 4,  # the metric and the OOF cache: the models' validation scores use the metric
    "models": 5,
    "training": 6,
    "ensemble": 7,
    "inference": 8,
    "pipeline": 9,
    "kaggle": 10,
    "cli": 11, "__main__": 11, "__init__": 11,
}


def module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYERS:
        raise KeyError(f"{module}: not in the layer table of tests/test_layers.py; add its subpackage")
    return LAYERS[top]


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The ``neuroseg`` modules ``path`` imports (``from neuroseg.x import y`` counts as x.y when y
    is a module, else as x)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
            names = [n for n in names[1:] if n in known] or [target]
        else:
            continue
        out.update(n for n in names if n == "neuroseg" or n.startswith("neuroseg."))
    out.discard(module)
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    files = sorted(package.rglob("*.py"))
    known = {module_name(p, package) for p in files}
    graph = {}
    for p in files:
        name = module_name(p, package)
        graph[name] = {m for m in imports_of(p, name, known) if m in known and m != "neuroseg"}
    return graph


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b} (layer {layer_of(a)} imports layer {layer_of(b)})"
                  for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_imports_only_downward_and_has_no_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and "neuroseg.pipeline.train_folds" in graph  # the real tree was read
    assert upward_edges(graph) == []
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_library_module_imports_the_pipeline():
    graph = import_graph(PACKAGE)
    users = sorted(a for a, deps in graph.items() for b in deps
                   if b.startswith("neuroseg.pipeline") and layer_of(a) < LAYERS["pipeline"])
    assert users == []


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "neuroseg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root / "neuroseg"


def test_a_planted_cycle_and_an_upward_import_are_named(tmp_path):
    pkg = write_tree(tmp_path, {
        "__init__.py": "",
        "utils/__init__.py": "",
        "utils/a.py": "def f():\n    from neuroseg.data import b  # lazy, still an edge\n",
        "data/__init__.py": "",
        "data/b.py": "from neuroseg.data.c import g\n",
        "data/c.py": "from neuroseg.data import b\n",
        "structures/__init__.py": "",
        "structures/d.py": "from . import e\nfrom ..utils.a import f\n",
        "structures/e.py": "",
    })
    graph = import_graph(pkg)
    assert graph["neuroseg.structures.d"] == {"neuroseg.structures.e", "neuroseg.utils.a"}  # relative ones
    assert upward_edges(graph) == ["neuroseg.utils.a -> neuroseg.data.b (layer 0 imports layer 3)"]
    assert find_cycle(graph) == ["neuroseg.data.b", "neuroseg.data.c", "neuroseg.data.b"]


def test_an_unknown_subpackage_must_be_placed_in_the_table():
    with pytest.raises(KeyError, match="neuroseg.plugins.x: not in the layer table"):
        layer_of("neuroseg.plugins.x")
