"""The layers of the package, checked from the source (see docs/architecture.md).

Every module under bitmig/ is parsed with `ast`; every import counts, also those inside
functions and under `if TYPE_CHECKING:` (a type-only import still couples the modules).
A module may import its own layer or a lower one, never a higher one, and no modules may
import each other around a loop (the judge is ../shared/hooks/import_cycles.py; this test
resolves imports the same way).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bitmig"

# Lowest first. The package root (bitmig/__init__.py) only holds the version: lowest of all.
LAYERS = ("bitmig", "protocol", "core", "session", "qemu", "daemon", "tools", "cli")

# Import edges (importer, imported) tolerated in a cycle while a refactoring is under way:
# each entry hides exactly one edge from the cycle check, and an entry whose edge is gone
# fails the test, so the list only shrinks. Empty: keep it so.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


# The sans-IO layers take bytes, events and `now` from their caller: they never open a
# socket, run an event loop, start a process or thread, or read a clock.
SANS_IO_LAYERS = ("protocol", "core", "session")
IO_MODULES = ("asyncio", "selectors", "signal", "socket", "ssl", "subprocess", "threading",
              "time")
# (module, I/O module) imports tolerated while being removed; empty: keep it so.
KNOWN_IO_IMPORTS: set[tuple[str, str]] = set()


def module_files() -> dict[str, Path]:
    mods = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


MODULES = module_files()


def layer_of(module: str) -> str:
    """The layer a module belongs to, from its folder."""
    parts = module.split(".")
    if parts == ["bitmig"]:
        return "bitmig"
    if parts[1] in ("cli", "__main__"):
        return "cli"
    if parts[1] in LAYERS:
        return parts[1]
    raise AssertionError(f"{module} sits in no layer: put it in one of the folders "
                         f"{', '.join(LAYERS[1:-1])} (or add a layer to docs/architecture.md "
                         "and LAYERS)")


def stdlib_imports_of(module: str) -> dict[str, int]:
    """Top-level names of the non-bitmig modules `module` imports -> first line."""
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.setdefault(a.name.split(".")[0], node.lineno)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.setdefault(node.module.split(".")[0], node.lineno)
    return out


def imports_of(module: str) -> dict[str, int]:
    """bitmig modules that `module` imports -> line of the first such import."""
    path = MODULES[module]
    out: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        if name in MODULES and name != module and not module.startswith(name + "."):
            out.setdefault(name, line)  # an import of one's own package is no edge

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            add(base, node.lineno)
            for a in node.names:  # `from bitmig.protocol import spec` imports a module
                add(f"{base}.{a.name}", node.lineno)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_is_in_a_layer() -> None:
    for m in MODULES:
        layer_of(m)


def test_no_module_imports_a_higher_layer() -> None:
    bad = []
    for m, deps in GRAPH.items():
        own = LAYERS.index(layer_of(m))
        for d, line in deps.items():
            if LAYERS.index(layer_of(d)) > own:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {m} ({layer_of(m)}) "
                           f"imports {d} ({layer_of(d)})")
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
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


def test_cycle_finder_finds_a_loop() -> None:
    # the checker itself must be able to fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = {m: {d for d in deps if (m, d) not in KNOWN_CYCLE_EDGES}
             for m, deps in GRAPH.items()}
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        " <-> ".join(c) + "\n  edges: " + ", ".join(
            f"{MODULES[a].relative_to(ROOT)}:{GRAPH[a][b]} {a} -> {b}"
            for a in c for b in sorted(graph[a]) if b in c)
        for c in found)


@pytest.mark.parametrize(("importer", "imported"), sorted(KNOWN_CYCLE_EDGES))
def test_known_cycle_edges_still_exist(importer: str, imported: str) -> None:
    assert imported in GRAPH.get(importer, {}), (
        f"{importer} no longer imports {imported}: remove the entry from KNOWN_CYCLE_EDGES")


def test_sans_io_layers_do_no_io() -> None:
    bad = []
    for m in MODULES:
        if layer_of(m) not in SANS_IO_LAYERS:
            continue
        for name, line in stdlib_imports_of(m).items():
            if name in IO_MODULES and (m, name) not in KNOWN_IO_IMPORTS:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {m} imports {name}")
    assert not bad, "I/O or clock in a sans-IO layer (pass `now` in instead):\n" + "\n".join(bad)


@pytest.mark.parametrize(("module", "name"), sorted(KNOWN_IO_IMPORTS))
def test_known_io_imports_still_exist(module: str, name: str) -> None:
    assert name in stdlib_imports_of(module), (
        f"{module} no longer imports {name}: remove the entry from KNOWN_IO_IMPORTS")
