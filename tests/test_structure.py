"""The package's modules import one another without circles (docs/DESIGN.md, "Architecture").

The import graph is read from the source with ``ast``: every ``import`` and ``from ... import``
of a module of ``ap_erase_fast`` counts, the ones inside functions included (a function-local
import is still a dependency; it only hides the circle until the function runs). A circle
fails the test and is printed, module by module, so the fix is to move the shared piece one
floor down (see how ``conditioning``, ``runtime``, ``_version`` and ``models/parts`` were made).

Mutation check (done when the test was written): putting back ``from .backbones import Cond``
inside ``sampling.sample_until`` made it fail with

    import circle among ap_erase_fast.backbones, ap_erase_fast.backbones.base, ...:
        ap_erase_fast.backbones -> ap_erase_fast.backbones.base -> ap_erase_fast.sampling -> ap_erase_fast.backbones

and putting back ``from . import __version__`` in ``engine.py`` made it fail with
``ap_erase_fast -> ap_erase_fast.engine -> ap_erase_fast``; with the lines removed it passes.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ap_erase_fast"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the package (a package is its __init__)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(module: str, path: Path, node: ast.AST, mods: dict[str, Path]) -> list[str]:
    """The package modules an import statement of ``module`` depends on."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        # `from pkg import mod` depends on pkg.mod where that is a module, else on pkg
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source
                 for a in node.names]
    out = []
    for name in names:
        # `import a.b.c` also runs a and a.b: depend on the longest package module named
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = module_files(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(_targets(module, path, node, mods))
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete import path around ``component``: a -> b -> ... -> a (shortest from its first)."""
    members = set(component)
    start = component[0]
    previous = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    return component


def test_graph_sees_the_package():
    graph = import_graph()
    assert "ap_erase_fast.cli" in graph and "ap_erase_fast.backbones.base" in graph
    # function-local imports count: cli imports the benchmarks only inside a function
    assert "ap_erase_fast.bench" in graph["ap_erase_fast.cli"]
    assert "ap_erase_fast.sampling" in graph["ap_erase_fast.backbones.base"]


def test_circles_are_found_and_printed():
    """The detector itself: a made-up graph with a circle and a tail."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_import_circles():
    graph = import_graph()
    found = circles(graph)
    message = "\n".join(
        f"import circle among {', '.join(c)}:\n    " + " -> ".join(one_cycle(graph, c)) for c in found)
    assert not found, "\n" + message
