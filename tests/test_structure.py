"""The code's shape: no import circles, and an in-sandbox agent of small modules.

The import graph is read from the source with ``ast`` (nothing is imported):
every ``import`` and ``from ... import`` of a ``toolq`` module, at any depth
(inside functions and ``if TYPE_CHECKING:`` blocks too), is an arrow from the
importing file to the module it names. A circle of arrows is a strongly
connected component of more than one module (or a module importing itself).

Run as a script to print the graph's circles: ``python tests/test_structure.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# How the top-level folders are installed (pyproject.toml's package-dir).
PACKAGES = {
    "schemas": "toolq.schemas",
    "producer": "toolq.producer",
    "worker": "toolq.worker",
    "integrations": "toolq.integrations",
}
AGENT_DIR = ROOT / "worker" / "agent"
MAX_AGENT_MODULE_LINES = 400


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the toolq packages."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The toolq modules the file ``path`` (module ``name``) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # ``from pkg import mod`` names the module; ``from mod import x`` the file.
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
    return {t for t in targets if t in modules and t != name} | (
        {name} if name in targets else set()
    )


def import_graph() -> dict[str, set[str]]:
    """``{module: the toolq modules it imports}``."""
    modules = module_files()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a circle in them (Tarjan's, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
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
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return sorted(found)


def test_no_module_imports_itself_through_others():
    assert circles(import_graph()) == []


def test_the_circle_finder_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert circles(graph) == [["a", "b", "c"], ["e"]]


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "toolq.worker.channel" in graph["toolq.worker.runner"]  # at the top, relative
    assert "toolq.worker.cli" in graph["toolq.producer.cli"]  # in a function, absolute
    assert "toolq.worker.settings" in graph["toolq.worker.backends.docker_exchange"]  # typing
    assert "toolq.worker.agent.protocol" in graph["toolq.worker.agent.loop"]  # the agent's own
    assert "toolq.producer" in graph["toolq.integrations.swerex"]  # a package's __init__


def test_the_agent_modules_are_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in AGENT_DIR.glob("*.py")}
    assert len(sizes) >= 6, sizes
    too_long = {name: n for name, n in sizes.items() if n > MAX_AGENT_MODULE_LINES}
    assert not too_long, too_long


if __name__ == "__main__":
    found = circles(import_graph())
    for component in found:
        print(" <-> ".join(component))
    sys.exit(1 if found else 0)
