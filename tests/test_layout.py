"""The package's layout: imports run downward (no circles), and the training loop stays one screenful.

The import graph is read from the source with `ast` (nothing of dapo or torch is imported): one node per
module of ``src/dapo`` (a package is its ``__init__``), one edge per dapo-internal import anywhere in a
file, at the top, inside a function, or under ``if TYPE_CHECKING:``, since each is a dependency of the
module all the same. An import names the module it reaches:

- ``import dapo.a.b`` and ``from dapo.a import b`` (``b`` a module) reach ``dapo.a.b``;
- ``from dapo.a import name``, where ``name`` is something the package ``dapo.a`` re-exports from one of
  its submodules (``from dapo.a.sub import name`` in its ``__init__``), reaches ``dapo.a.sub``, the
  module that holds it, so a façade never hides a circle between the modules behind it;
- anything else (a name the ``__init__`` itself defines) reaches the package ``dapo.a``.

A package importing its own submodules (``dapo.a`` → ``dapo.a.sub``, at any depth) is the package's façade
gathering its rooms, not a dependency between rooms: those edges are left out of the graph, and every
other edge counts: the graph must have no cycle. The one circle that rule could hide, a module importing
a name its own package's ``__init__`` defines while that ``__init__`` imports the module, is checked on
its own (`test_no_module_imports_the_facade_that_imports_it`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "dapo"
TRAINER_MAX_LINES = 250


def modules(package: Path) -> dict[str, Path]:
    """Module name → file, for every module of ``package`` (a directory named after it)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(tree: ast.AST, name: str, is_package: bool) -> Iterator[tuple[str, list[str]]]:
    """(module, names) of each dapo-internal import in ``tree`` (``names`` empty for ``import x``),
    relative imports resolved against ``name``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "dapo" or alias.name.startswith("dapo."):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "dapo" or base.startswith("dapo."):
                yield base, [alias.name for alias in node.names]


def import_graph(package: Path = PACKAGE, *, facades: bool = False) -> dict[str, set[str]]:
    """Module → the dapo modules it imports (see the module docstring for the rules); ``facades``: only
    the edges left out, each package to the submodules its ``__init__`` imports."""
    files = modules(package)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in files.items()}
    found = {
        name: list(imports(tree, name, files[name].name == "__init__.py")) for name, tree in trees.items()
    }
    # what each package's __init__ re-exports, and from which of its submodules
    reexports: dict[str, dict[str, str]] = {}
    for name, path in files.items():
        if path.name == "__init__.py":
            reexports[name] = {
                n: target
                for target, names in found[name]
                if target.startswith(name + ".") and target in files
                for n in names
            }

    def reached(target: str, names: list[str]) -> list[str]:
        if not names:
            return [target]
        out = []
        for n in names:
            if f"{target}.{n}" in files:
                out.append(f"{target}.{n}")
            else:
                out.append(reexports.get(target, {}).get(n, target))
        return out

    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, items in found.items():
        for target, names in items:
            for module in reached(target, names):
                assert module in files, f"{name} imports {module}, which is not a module of src/dapo"
                own_submodule = files[name].name == "__init__.py" and module.startswith(name + ".")
                if module != name and own_submodule == facades:
                    graph[name].add(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_every_import_and_through_facades(tmp_path: Path) -> None:
    """Imports inside functions and TYPE_CHECKING blocks count; a façade's name reaches its submodule;
    a package importing its own submodules is no edge."""
    files = {
        "__init__.py": "",
        "algo.py": "",
        "errors.py": "",
        "config.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dapo.loop import Loop\n",
        "rewards/__init__.py": "from dapo.rewards.base import score\n\nLIMIT = 1\n",
        "rewards/base.py": "def score() -> None:\n    from dapo import errors\n",
        "loop.py": (
            "import dapo.algo\n"
            "from dapo.config import Config\n"
            "def f() -> None:\n"
            "    from dapo.rewards import LIMIT, score\n"
        ),
    }
    for name, text in files.items():
        (tmp_path / "dapo" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dapo" / name).write_text(text)
    graph = import_graph(tmp_path / "dapo")
    assert import_graph(tmp_path / "dapo", facades=True)["dapo.rewards"] == {"dapo.rewards.base"}
    assert graph["dapo.loop"] == {"dapo.algo", "dapo.config", "dapo.rewards", "dapo.rewards.base"}
    assert graph["dapo.rewards"] == set()  # its own submodule
    assert graph["dapo.rewards.base"] == {"dapo.errors"}
    assert graph["dapo.config"] == {"dapo.loop"}
    assert find_cycle(graph) == ["dapo.config", "dapo.loop", "dapo.config"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_run_downward() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_the_facade_that_imports_it() -> None:
    """``dapo.a.sub`` importing a name ``dapo/a/__init__.py`` defines, while that ``__init__`` imports
    ``dapo.a.sub`` (directly or through others), is a circle through the façade."""
    graph, facade = import_graph(), import_graph(facades=True)
    both = {name: graph[name] | facade[name] for name in graph}
    for name, targets in graph.items():
        for package in sorted(t for t in targets if name.startswith(t + ".")):
            seen, todo = set(), [package]
            while todo:
                node = todo.pop()
                assert node != name, f"import cycle through a façade: {name} -> {package} -> ... -> {name}"
                if node not in seen:
                    seen.add(node)
                    todo.extend(both[node])


def test_the_training_loop_fits_a_screenful() -> None:
    lines = len((PACKAGE / "trainer.py").read_text().splitlines())
    assert lines <= TRAINER_MAX_LINES, f"src/dapo/trainer.py has {lines} lines (at most {TRAINER_MAX_LINES})"
