"""What the codemod knows about the files it migrates: modules, functions, findings.

Decisions are kept by node identity (the transformer walks the same trees), so the rewrite
only applies what the analysis decided.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

__all__ = [
    "APP_FACTORIES",
    "APP_NAMES",
    "ASYNC_DUNDERS",
    "CLIENT",
    "CLI_HELPER",
    "HTTP_METHODS",
    "VIEW_CLASSES",
    "Finding",
    "Func",
    "ModuleInfo",
    "call_of",
    "dotted_name",
    "last_name",
    "module_name",
]

APP_NAMES = frozenset({"app", "application", "bp", "blueprint", "api", "current_app"})
APP_FACTORIES = frozenset({"Flask", "Quart", "Blueprint"})
CLIENT = re.compile(r"_?(test_)?client")
ASYNC_DUNDERS = frozenset({"__aenter__", "__aexit__", "__anext__", "__aiter__"})
#: The helper :mod:`.transform` adds for async click commands (left alone on a second run).
CLI_HELPER = "_run_async_command"
VIEW_CLASSES = frozenset({"MethodView", "View"})
HTTP_METHODS = frozenset(
    {"get", "post", "put", "patch", "delete", "head", "options", "dispatch_request"}
)


@dataclass(frozen=True, order=True)
class Finding:
    """Something the codemod could not do, or a change it couldn't make safe by itself."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(eq=False)
class Func:
    """One ``def`` (module level, method or nested) and what pass one learnt about it."""

    key: str
    node: cst.FunctionDef
    module: ModuleInfo
    parent: Func | None
    in_class: str | None
    params: frozenset[str]
    awaits: bool = False  # awaits something Quart made a coroutine, or is already async
    hook: bool = False  # a view, hook or error handler
    cli: bool = False  # a click command
    fixture: bool = False
    forced: bool = False  # e.g. a monkeypatched stand-in for an async function
    returns_client: bool = False
    decorators: list[str] = field(default_factory=list)  # resolved keys
    calls: list[tuple[list[str], cst.Call]] = field(default_factory=list)
    param_calls: list[cst.Call] = field(default_factory=list)
    returned_calls: list[list[str]] = field(default_factory=list)
    local_defs: dict[str, str] = field(default_factory=dict)
    clients: set[str] = field(default_factory=set)
    not_clients: set[str] = field(default_factory=set)
    streams: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    assigned: dict[str, list[tuple[list[str], cst.Call]]] = field(default_factory=dict)
    response_uses: list[tuple[str, cst.CSTNode]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name.value


class ModuleInfo:
    """One file: its tree, its import table and the decisions taken for its nodes."""

    def __init__(self, path: Path, name: str, source: str) -> None:
        self.path = path
        self.name = name
        self.source = source
        self.tree = cst.parse_module(source)
        self.wrapper = MetadataWrapper(self.tree, unsafe_skip_copy=True)
        self.positions = self.wrapper.resolve(PositionProvider)
        stem = path.name
        self.is_test = (
            stem == "conftest.py" or stem.startswith("test_") or stem.endswith("_test.py")
        )
        self.imports: dict[str, str] = {}
        self.defs: dict[str, str] = {}
        self.bridges: set[str] = set()
        self.apps: set[str] = set()
        self.funcs: list[Func] = []
        self.await_nodes: set[cst.CSTNode] = set()
        self.async_withs: set[cst.With] = set()
        self.async_fors: set[cst.For | cst.CompFor] = set()
        self.attr_renames: dict[cst.Attribute, str] = {}
        self.keyword_renames: dict[cst.Arg, str] = {}
        self.client_withs: set[cst.WithItem] = set()
        self.prefix_calls: set[cst.Call] = set()
        self.top_level_calls: list[tuple[list[str], cst.Call]] = []
        self.monkeypatches: list[tuple[Func, str, str]] = []
        self.blocking: list[tuple[Func, str, cst.Call]] = []
        self.findings: list[Finding] = []

    def line(self, node: cst.CSTNode) -> int:
        return int(self.positions[node].start.line)

    def report(self, node: cst.CSTNode, message: str) -> None:
        self.findings.append(Finding(str(self.path), self.line(node), message))

    @property
    def package(self) -> str:
        if self.path.name == "__init__.py":
            return self.name
        return self.name.rpartition(".")[0]


def module_name(path: Path) -> str:
    """The dotted name ``path`` is imported as: parents with ``__init__.py`` are packages."""
    parts = [] if path.name == "__init__.py" else [path.stem]
    parent = path.parent
    while (parent / "__init__.py").exists():
        parts.insert(0, parent.name)
        parent = parent.parent
    return ".".join(parts) or path.stem


def dotted_name(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        base = dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr.value}"
    return None


def last_name(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return node.attr.value
    return None


def call_of(node: cst.BaseExpression) -> cst.Call | None:
    return node if isinstance(node, cst.Call) else None
