"""The package's layers import only downwards, and no llmbridge module imports itself
back through others: read from the source with ``ast``, so an import inside a function
(a lazy one) counts as much as one at the top; only ``if TYPE_CHECKING:`` blocks don't.

The layers, bottom up (docs/discussion/design.md explains them):

    _exceptions  ->  _sansio  ->  _core  ->  _runtime  ->  _policies | _backends
                 ->  _web  ->  _openai  ->  _host  ->  public modules (llmbridge, ...)
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llmbridge"

# What each private layer may import from llmbridge (its own layer included), and which
# third-party distributions it may use. Public modules (no underscore) may import anything.
ALLOWED: dict[str, set[str]] = {
    "_exceptions": set(),
    "_sansio": {"_exceptions", "_sansio"},
    "_core": {"_exceptions", "_sansio", "_core"},
    "_runtime": {"_exceptions", "_sansio", "_core", "_runtime"},
    "_policies": {"_exceptions", "_sansio", "_core", "_runtime", "_policies"},
    "_backends": {"_exceptions", "_sansio", "_core", "_runtime", "_backends"},
    "_web": {"_exceptions", "_sansio", "_core", "_runtime", "_policies", "_backends", "_web"},
    "_openai": {
        *("_exceptions", "_sansio", "_core", "_runtime", "_policies", "_backends", "_web"),
        "_openai",
    },
    # The Flask -> Quart codemod: libcst and the standard library, nothing of the runtime.
    "_migrate": {"_migrate"},
    # The shared engine process and its client: an OpenAI surface over the web body.
    "_host": {
        *("_exceptions", "_sansio", "_core", "_runtime", "_policies", "_backends", "_web"),
        *("_openai", "_host"),
    },
    # The command line sits on top: it drives the public API (and may reach any layer).
    "_cli": {
        *("_exceptions", "_sansio", "_core", "_runtime", "_policies", "_backends", "_web"),
        *("_openai", "_migrate", "_host", "_cli", "public"),
    },
}
# The bottom layers are I/O-free or nearly: the standard library, and for _core anyio and
# uvloop (the engine thread's event loop when it is installed: _core.drivers).
THIRD_PARTY: dict[str, set[str]] = {
    "_exceptions": set(),
    "_sansio": set(),
    "_core": {"anyio", "uvloop"},
}

# Known edges that break the rules today, each being removed by the restructure now under
# way. The test fails on any edge not listed here, and on a listed edge that has gone
# (so the list shrinks as the fixes land): empty it once they are merged.
KNOWN_VIOLATIONS: set[tuple[str, str]] = {
    # Up a layer: CallableBackend runs a sync callable with _runtime.offload.run_in_thread
    # (a lazy import inside the driver).
    ("llmbridge._core.drivers", "llmbridge._runtime.offload"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    """``_core`` for ``llmbridge._core.engine``, ``public`` for ``llmbridge.flask``."""
    parts = module.split(".")
    if len(parts) == 1 or not parts[1].startswith("_") or parts[1].startswith("__"):
        return "public"  # llmbridge, llmbridge.flask, llmbridge.__main__
    return parts[1]


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def resolve(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The modules ``node`` imports, absolute: llmbridge's by module, others by their
    top-level name. ``from pkg import name`` names ``pkg.name`` when that is a module."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:
        is_package = modules()[module].name == "__init__.py"
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    yield target
    for alias in node.names:
        if f"{target}.{alias.name}" in modules():
            yield f"{target}.{alias.name}"


@cache
def edges() -> dict[str, set[str]]:
    """``module -> imported modules`` (llmbridge's own, and third-party top-level names)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {t for node in import_nodes(tree) for t in resolve(module, node)}
        # A package's __init__ runs before its modules; that is not an import of it.
        graph[module] = {t for t in targets if t != module and t != "__future__"}
    return graph


def internal(targets: set[str]) -> set[str]:
    return {t for t in targets if t == "llmbridge" or t.startswith("llmbridge.")}


def violations() -> set[tuple[str, str]]:
    """Edges that point up (or sideways) a layer, or to a third party the layer mustn't use."""
    found = set()
    for module, targets in edges().items():
        own = layer(module)
        if own == "public":
            continue
        assert own in ALLOWED, f"{module}: a private package that no layer names"
        for target in internal(targets):
            if layer(target) not in ALLOWED[own]:
                found.add((module, target))
        if own in THIRD_PARTY:
            for target in targets - internal(targets):
                top = target.split(".")[0]
                if top not in sys.stdlib_module_names and top not in THIRD_PARTY[own]:
                    found.add((module, top))
    return found


def cycle_edges() -> set[tuple[str, str]]:
    """Edges inside a strongly connected component of llmbridge's import graph (Tarjan)."""
    graph = {m: internal(t) & set(modules()) for m, t in edges().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return {
        (a, b)
        for component in components
        if len(component) > 1
        for a in component
        for b in graph[a]
        if b in component
    }


def problems() -> set[tuple[str, str]]:
    return violations() | cycle_edges()


def describe(pairs: set[tuple[str, str]]) -> str:
    return "\n".join(f"  {a} -> {b}" for a, b in sorted(pairs))


def test_the_import_reader_sees_lazy_imports_and_skips_type_checking() -> None:
    """The reader counts an import inside a function, and skips ``if TYPE_CHECKING:``
    (checked on a snippet, so a reader that saw nothing couldn't pass the tests below)."""
    tree = ast.parse(
        "import a\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import hidden\nelse:\n    import shown\n"
        "def f():\n    from .sibling import thing\n"
    )
    names = {alias.name for node in import_nodes(tree) for alias in node.names}
    assert names == {"a", "TYPE_CHECKING", "shown", "thing"}
    assert "llmbridge._core.drivers" in edges()["llmbridge._core.engine"]


def test_every_module_is_in_a_layer() -> None:
    """Every private package of llmbridge is one of the named layers."""
    layers = {layer(m) for m in modules()}
    assert layers <= {*ALLOWED, "public"}, layers - {*ALLOWED, "public"}
    assert {"_exceptions", "_sansio", "_core", "_runtime", "_web", "_openai"} <= layers


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_layer_imports_only_downwards(name: str) -> None:
    """No module of the layer imports a layer above it or beside it, or a third party
    its layer may not use (known edges being fixed aside: KNOWN_VIOLATIONS)."""
    bad = {(a, b) for a, b in violations() if layer(a) == name} - KNOWN_VIOLATIONS
    assert not bad, f"imports that point up a layer:\n{describe(bad)}"


def test_no_import_cycles() -> None:
    """No llmbridge module imports itself back through others, lazily or not (known
    edges being fixed aside: KNOWN_VIOLATIONS)."""
    bad = cycle_edges() - KNOWN_VIOLATIONS
    assert not bad, f"edges inside an import cycle:\n{describe(bad)}"


def test_known_violations_still_exist() -> None:
    """Every allow-listed edge still breaks a rule: once the fix lands, delete its entry."""
    gone = KNOWN_VIOLATIONS - problems()
    assert not gone, f"fixed, remove from KNOWN_VIOLATIONS:\n{describe(gone)}"
