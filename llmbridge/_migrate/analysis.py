"""Pass one of the codemod: read every module, decide what must become ``async`` and what
must be awaited, and what can't be migrated mechanically.

The decisions are kept by node identity (the transformer walks the same trees), so the
rewrite in :mod:`.transform` only applies them. What becomes async is a fixpoint over the
whole set of files: a function is async if it is a view, hook or error handler, if it awaits
something Quart made a coroutine, or if it calls a function that became async.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from . import rules

__all__ = ["CLI_HELPER", "Finding", "Func", "ModuleInfo", "Project", "dotted_name"]

_APP_NAMES = frozenset({"app", "application", "bp", "blueprint", "api", "current_app"})
_APP_FACTORIES = frozenset({"Flask", "Quart", "Blueprint"})
_CLIENT = re.compile(r"_?(test_)?client")
_ASYNC_DUNDERS = frozenset({"__aenter__", "__aexit__", "__anext__", "__aiter__"})
#: The helper :mod:`.transform` adds for async click commands (left alone on a second run).
CLI_HELPER = "_run_async_command"
_VIEW_CLASSES = frozenset({"MethodView", "View"})
_HTTP_METHODS = frozenset(
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
        self.async_fors: set[cst.For] = set()
        self.attr_renames: dict[cst.Attribute, str] = {}
        self.keyword_renames: dict[cst.Arg, str] = {}
        self.client_withs: set[cst.WithItem] = set()
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


def _last(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return node.attr.value
    return None


def _call_of(node: cst.BaseExpression) -> cst.Call | None:
    return node if isinstance(node, cst.Call) else None


class _Collector(cst.CSTVisitor):
    """Walks one module, filling its :class:`ModuleInfo` and the project's function table."""

    def __init__(self, project: Project, module: ModuleInfo) -> None:
        self.project = project
        self.m = module
        self.stack: list[Func] = []
        self.classes: list[tuple[str, bool]] = []  # (name, is a view class)
        self.lambdas = 0
        self.for_iters: set[cst.CSTNode] = set()
        self.with_items: set[cst.CSTNode] = set()
        self.skipped: set[cst.FunctionDef] = set()

    # -- resolution -------------------------------------------------------------------

    def candidates(self, node: cst.BaseExpression) -> list[str]:
        """Candidate keys/dotted names a callee expression may mean."""
        if isinstance(node, cst.Name):
            for func in reversed(self.stack):
                if node.value in func.local_defs:
                    return [func.local_defs[node.value]]
            if node.value in self.m.defs:
                return [self.m.defs[node.value]]
            if node.value in self.m.imports:
                return [self.m.imports[node.value]]
            return []
        if isinstance(node, cst.Attribute):
            base = node.value
            if isinstance(base, cst.Name) and base.value == "self" and self.classes:
                return [f"{self.m.name}.{self.classes[-1][0]}.{node.attr.value}"]
            dotted = dotted_name(node)
            if dotted is not None:
                head, _, rest = dotted.partition(".")
                if head in self.m.imports:
                    return [f"{self.m.imports[head]}.{rest}"]
            return [f"*.{node.attr.value}"]  # a method of something: matched by name later
        return []

    def dotted(self, node: cst.BaseExpression) -> str | None:
        found = self.candidates(node)
        return found[0] if found and not found[0].startswith("*.") else None

    def is_flask(self, node: cst.BaseExpression, names: frozenset[str] | set[str]) -> bool:
        dotted = self.dotted(node)
        if dotted is None:
            return False
        module, _, name = dotted.rpartition(".")
        return module in ("flask", "quart") and name in names

    def is_request(self, node: cst.BaseExpression) -> bool:
        return self.is_flask(node, {"request"})

    def is_app(self, node: cst.BaseExpression) -> bool:
        name = _last(node)
        if name is None:
            return False
        return (
            name in _APP_NAMES
            or name in self.m.apps
            or name.endswith(("_app", "_bp", "_blueprint"))
            or (isinstance(node, cst.Name) and self.m.imports.get(name, "") in self.project.apps)
        )

    def is_bridge(self, node: cst.BaseExpression) -> bool:
        if not isinstance(node, cst.Name):
            return False
        return node.value in self.m.bridges or self.m.imports.get(node.value) in (
            self.project.bridges
        )

    def is_client(self, node: cst.BaseExpression) -> bool:
        if not self.m.is_test:
            return False
        name = _last(node)
        if name is None:
            return False
        func = self.stack[-1] if self.stack else None
        return bool(_CLIENT.fullmatch(name)) or (func is not None and name in func.clients)

    def is_client_request(self, node: cst.BaseExpression) -> bool:
        call = _call_of(node)
        return (
            call is not None
            and isinstance(call.func, cst.Attribute)
            and call.func.attr.value in rules.CLIENT_METHODS
            and self.is_client(call.func.value)
        )

    # -- recording --------------------------------------------------------------------

    def awaited(self, node: cst.CSTNode) -> None:
        self.m.await_nodes.add(node)
        if self.stack:
            self.stack[-1].awaits = True
        elif self.lambdas == 0:
            self.m.report(node, "awaits at import time: move this into an async function")

    # -- scopes -----------------------------------------------------------------------

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        bases = {_last(arg.value) for arg in node.bases}
        self.classes.append((node.name.value, bool(bases & _VIEW_CLASSES)))
        if not self.stack:
            self.m.defs.setdefault(node.name.value, f"{self.m.name}.{node.name.value}")

    def leave_ClassDef(self, original_node: cst.ClassDef) -> None:
        self.classes.pop()

    def visit_Lambda(self, node: cst.Lambda) -> None:
        self.lambdas += 1

    def leave_Lambda(self, original_node: cst.Lambda) -> None:
        self.lambdas -= 1

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        parent = self.stack[-1] if self.stack else None
        if parent is None and not self.classes and node.name.value == CLI_HELPER:
            self.m.defs[CLI_HELPER] = f"{self.m.name}.{CLI_HELPER}"
            self.skipped.add(node)
            return False  # what a previous run added: already migrated
        in_class = self.classes[-1][0] if self.classes and parent is None else None
        if parent is not None:
            key = f"{parent.key}.{node.name.value}"
            parent.local_defs[node.name.value] = key
        elif in_class is not None:
            key = f"{self.m.name}.{in_class}.{node.name.value}"
        else:
            key = f"{self.m.name}.{node.name.value}"
            self.m.defs[node.name.value] = key
        params = {p.name.value for p in (*node.params.params, *node.params.posonly_params)}
        params |= {p.name.value for p in node.params.kwonly_params}
        func = Func(key, node, self.m, parent, in_class, frozenset(params))
        func.awaits = node.asynchronous is not None
        if in_class is not None and self.classes[-1][1] and node.name.value in _HTTP_METHODS:
            func.hook = True
        for decorator in node.decorators:
            self._decorator(func, decorator.decorator)
        self.project.funcs[key] = func
        self.m.funcs.append(func)
        self.stack.append(func)
        return True

    def leave_FunctionDef(self, original_node: cst.FunctionDef) -> None:
        if original_node not in self.skipped:
            self.stack.pop()

    def _decorator(self, func: Func, expr: cst.BaseExpression) -> None:
        target = expr.func if isinstance(expr, cst.Call) else expr
        dotted = self.dotted(target) or ""
        if dotted in ("pytest.fixture", "pytest_asyncio.fixture"):
            func.fixture = True
        elif dotted in ("click.command",) or (
            isinstance(target, cst.Attribute)
            and target.attr.value == "command"
            and (dotted_name(target.value) or "").endswith("cli")
        ):
            func.cli = True
        elif (
            isinstance(target, cst.Attribute)
            and target.attr.value in rules.HOOK_DECORATORS
            and self.is_app(target.value)
        ):
            func.hook = True
        if (
            isinstance(target, cst.Attribute)
            and target.attr.value in ("to_thread", "to_process")
            and self.is_bridge(target.value)
        ):
            # QuartBridge's decorator makes the function awaitable, not async.
            self.project.awaitables.add(func.key)
        func.decorators.extend(self.candidates(target))

    # -- statements -------------------------------------------------------------------

    def visit_Assign(self, node: cst.Assign) -> None:
        value = node.value
        names = [t.target.value for t in node.targets if isinstance(t.target, cst.Name)]
        call = _call_of(value)
        if call is not None and not self.stack:
            factory = _last(call.func)
            if factory in ("FlaskBridge", "QuartBridge"):
                self.m.bridges.update(names)
                self.project.bridges.update(f"{self.m.name}.{n}" for n in names)
            if factory in _APP_FACTORIES:
                self.m.apps.update(names)
                self.project.apps.update(f"{self.m.name}.{n}" for n in names)
        if call is None or not self.stack:
            return
        func = self.stack[-1]
        if isinstance(call.func, cst.Attribute):
            attr = call.func.attr.value
            if attr == "submit" and self.is_bridge(call.func.value):
                func.streams.update(names)
            elif attr == "test_client":
                func.clients.update(names)
            elif _last(call.func) in _APP_FACTORIES:
                self.m.apps.update(names)
        for name in names:
            func.assigned.setdefault(name, []).append((self.candidates(call.func), call))

    def visit_Return(self, node: cst.Return) -> None:
        if self.stack and node.value is not None:
            call = _call_of(node.value)
            if call is not None:
                if self.is_client_request(call):
                    self.stack[-1].returns_client = True
                self.stack[-1].returned_calls.append(self.candidates(call.func))

    def visit_For(self, node: cst.For) -> None:
        it = node.iter
        call = _call_of(it)
        bridge_stream = (
            call is not None
            and isinstance(call.func, cst.Attribute)
            and call.func.attr.value in ("stream", "astream")
            and self.is_bridge(call.func.value)
        )
        named_stream = (
            isinstance(it, cst.Name) and bool(self.stack) and it.value in self.stack[-1].streams
        )
        if (bridge_stream or named_stream) and node.asynchronous is None:
            self.m.async_fors.add(node)
            if self.stack:
                self.stack[-1].awaits = True
            if call is not None:
                self.for_iters.add(call)

    def visit_With(self, node: cst.With) -> None:
        self.client_withs: list[cst.WithItem] = []
        kinds = [self._with_item(item) for item in node.items]
        if not any(kinds):
            return
        if not all(kinds):
            self.m.report(node, "mixes async and sync context managers: split this `with`")
            return
        if node.asynchronous is None:
            self.m.async_withs.add(node)
            self.m.client_withs.update(self.client_withs)
            if self.stack:
                self.stack[-1].awaits = True

    def _with_item(self, item: cst.WithItem) -> bool:
        expr = item.item
        alias = (
            item.asname.name.value
            if item.asname is not None and isinstance(item.asname.name, cst.Name)
            else None
        )
        call = _call_of(expr)
        func = self.stack[-1] if self.stack else None
        if call is not None and isinstance(call.func, cst.Attribute):
            attr = call.func.attr.value
            if attr in rules.RESOURCE_OPENERS:
                self.awaited(call)
                self.with_items.add(call)
                if alias and func is not None:
                    func.files.add(alias)
                return True
            if attr in rules.ASYNC_CONTEXTS:
                if attr == "test_client" and alias and func is not None:
                    func.clients.add(alias)
                return True
        if isinstance(expr, cst.Await):
            inner = _call_of(expr.expression)
            if inner is not None and _last(inner.func) in rules.RESOURCE_OPENERS:
                if alias and func is not None:
                    func.files.add(alias)
                return True
        if self.is_client(expr) and not isinstance(expr, cst.Call):
            self.client_withs.append(item)
            return True
        return False

    # -- expressions ------------------------------------------------------------------

    def visit_Attribute(self, node: cst.Attribute) -> None:
        attr = node.attr.value
        if attr in rules.REQUEST_ASYNC_ATTRS and self.is_request(node.value):
            self.awaited(node)
        elif self.m.is_test and attr in rules.RESPONSE_ASYNC_ATTRS:
            self._response_use(node.value, node)

    def _response_use(self, value: cst.BaseExpression, node: cst.CSTNode) -> None:
        if self.is_client_request(value):
            self.awaited(node)
        elif isinstance(value, cst.Name) and self.stack:
            self.stack[-1].response_uses.append((value.value, node))

    def visit_Call(self, node: cst.Call) -> None:
        func = self.stack[-1] if self.stack else None
        callee = node.func
        if isinstance(callee, cst.Attribute) and self._attribute_call(node, callee, func):
            return
        if self.is_flask(callee, rules.ASYNC_HELPERS):
            self.awaited(node)
            return
        dotted = self.dotted(callee)
        if dotted in rules.BLOCKING_CALLS and func is not None:
            self.m.blocking.append((func, dotted, node))
        if dotted in ("monkeypatch.setattr",) or (
            isinstance(callee, cst.Attribute)
            and callee.attr.value == "setattr"
            and _last(callee.value) == "monkeypatch"
        ):
            self._monkeypatch(node, func)
        if (
            func is not None
            and self.lambdas == 0
            and isinstance(callee, cst.Name)
            and func.parent is not None
            and callee.value in func.parent.params
        ):
            func.param_calls.append(node)  # a decorator's wrapper calling what it wraps
        candidates = self.candidates(callee)
        if not candidates:
            return
        if func is not None and self.lambdas == 0:
            func.calls.append((candidates, node))
        elif func is None and self.lambdas == 0:
            self.m.top_level_calls.append((candidates, node))

    def _attribute_call(self, node: cst.Call, callee: cst.Attribute, func: Func | None) -> bool:
        attr = callee.attr.value
        value = callee.value
        if attr in rules.REQUEST_ASYNC_METHODS and self.is_request(value):
            self.awaited(node)
            return True
        if attr in rules.BRIDGE_METHODS and self.is_bridge(value):
            new, await_it = rules.BRIDGE_METHODS[attr]
            if new != attr:
                self.m.attr_renames[callee] = new
            positional = [a for a in node.args if a.keyword is None]
            decorator_form = attr in ("to_thread", "to_process") and not positional
            if await_it and not decorator_form and node not in self.for_iters:
                self.awaited(node)
            return True
        if isinstance(value, cst.Name) and func is not None:
            if value.value in func.streams and attr in ("result", "wait_started"):
                self.m.attr_renames[callee] = "aresult" if attr == "result" else "await_started"
                self.awaited(node)
                return True
            if value.value in func.files and attr in ("read", "readline", "readlines"):
                self.awaited(node)
                return True
        if attr in rules.RESOURCE_OPENERS and node not in self.with_items:
            self.awaited(node)
            return True
        if self.m.is_test:
            if attr in rules.CLIENT_METHODS and self.is_client(value):
                self.awaited(node)
                for arg in node.args:
                    # Flask's client form-encodes a dict passed as data=; Quart's takes form=.
                    if arg.keyword is not None and arg.keyword.value == "data":
                        if isinstance(arg.value, cst.Dict):
                            self.m.keyword_renames[arg] = "form"
                        else:
                            self.m.report(
                                arg,
                                "data= is raw bytes in Quart's test client: pass form= "
                                "for a form, json= for JSON",
                            )
                return True
            if attr in rules.RESPONSE_ASYNC_METHODS:
                self._response_use(value, node)
                return True
        if attr in rules.HOOK_REGISTRATIONS and self.is_app(value):
            self._registration(node, rules.HOOK_REGISTRATIONS[attr], hook=True)
        elif attr == "add_command" and (dotted_name(value) or "").endswith("cli"):
            self._registration(node, "", hook=False)
        return False

    def _registration(self, node: cst.Call, keyword: str, *, hook: bool) -> None:
        arg: cst.BaseExpression | None = None
        for a in node.args:
            if keyword and a.keyword is not None and a.keyword.value == keyword:
                arg = a.value
        if arg is None and not keyword and node.args:
            arg = node.args[-1].value
        if arg is None:
            return
        self.project.registrations.append((self.candidates(arg), hook))

    def _monkeypatch(self, node: cst.Call, func: Func | None) -> None:
        if func is None:
            return
        args = [a.value for a in node.args]
        target: str | None = None
        if len(args) == 2 and isinstance(args[0], cst.SimpleString):
            target = args[0].evaluated_value if isinstance(args[0].evaluated_value, str) else None
            replacement = args[1]
        elif len(args) >= 3 and isinstance(args[1], cst.SimpleString):
            base = self.dotted(args[0])
            name = args[1].evaluated_value
            target = f"{base}.{name}" if base and isinstance(name, str) else None
            replacement = args[2]
        else:
            return
        if target is not None and isinstance(replacement, cst.Name):
            self.m.monkeypatches.append((func, target, replacement.value))


class Project:
    """Every file being migrated, analysed together (a call into another module counts)."""

    def __init__(self) -> None:
        self.modules: list[ModuleInfo] = []
        self.funcs: dict[str, Func] = {}
        self.bridges: set[str] = set()
        self.apps: set[str] = set()
        self.awaitables: set[str] = set()
        self.registrations: list[tuple[list[str], bool]] = []
        self.async_keys: set[str] = set()

    def add(self, path: Path, source: str) -> ModuleInfo:
        """Parse ``path``; raises :class:`libcst.ParserSyntaxError` on invalid Python."""
        module = ModuleInfo(path, module_name(path.resolve()), source)
        self.modules.append(module)
        return module

    def analyse(self) -> None:
        """Collect every module, then settle what is async (a fixpoint)."""
        for module in self.modules:
            self._imports(module)
        # Two rounds: the first learns where bridges and apps live, the second uses it.
        for module in self.modules:
            _prescan(self, module)
        for module in self.modules:
            module.wrapper.visit(_Collector(self, module))
        for candidates, hook in self.registrations:
            for key in candidates:
                if key in self.funcs:
                    self.funcs[key].hook = self.funcs[key].hook or hook
                    self.funcs[key].cli = self.funcs[key].cli or not hook
        self._settle()

    def _imports(self, module: ModuleInfo) -> None:
        for stmt in module.tree.body:
            if not isinstance(stmt, cst.SimpleStatementLine):
                continue
            for small in stmt.body:
                if isinstance(small, cst.Import):
                    for alias in small.names:
                        full = dotted_name(alias.name) or ""
                        if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
                            module.imports[alias.asname.name.value] = full
                        else:
                            head = full.partition(".")[0]
                            module.imports[head] = head
                elif isinstance(small, cst.ImportFrom) and not isinstance(
                    small.names, cst.ImportStar
                ):
                    base = dotted_name(small.module) if small.module is not None else ""
                    if small.relative:
                        package = module.package.split(".") if module.package else []
                        up = len(small.relative) - 1
                        package = package[: len(package) - up] if up else package
                        base = ".".join([*package, base] if base else package)
                    for alias in small.names:
                        name = dotted_name(alias.name) or ""
                        local = name
                        if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
                            local = alias.asname.name.value
                        module.imports[local] = f"{base}.{name}"

    def _callees(self, candidates: list[str]) -> list[str]:
        out: list[str] = []
        for key in candidates:
            if key.startswith("*."):
                method = key[2:]
                owners = [k for k, f in self.funcs.items() if f.in_class and f.name == method]
                if len(owners) == 1:
                    out.append(owners[0])
            else:
                out.append(key)
        return out

    def is_async(self, candidates: list[str]) -> bool:
        """Whether a call to one of ``candidates`` must be awaited."""
        return any(k in self.async_keys or k in self.awaitables for k in self._callees(candidates))

    def _settle(self) -> None:
        funcs = list(self.funcs.values())
        for func in funcs:
            if func.awaits or func.hook or func.forced:
                self.async_keys.add(func.key)
        changed = True
        while changed:
            changed = False
            wrapped = {d for f in funcs if f.key in self.async_keys for d in f.decorators}
            for func in funcs:
                if func.key in self.async_keys:
                    continue
                if any(self.is_async(c) for c, _ in func.calls) or (
                    func.param_calls and func.parent is not None and func.parent.key in wrapped
                ):
                    self.async_keys.add(func.key)
                    changed = True
            for module in self.modules:
                for owner, target, replacement in module.monkeypatches:
                    key = owner.local_defs.get(replacement) or module.defs.get(replacement)
                    if key and target in self.async_keys and key not in self.async_keys:
                        self.async_keys.add(key)
                        changed = True
        for func in funcs:
            name = func.name
            dunder = name.startswith("__") and name.endswith("__")
            if func.key in self.async_keys and dunder and name not in _ASYNC_DUNDERS:
                func.module.report(func.node, f"{name} would have to await, but can't be async")
                self.async_keys.discard(func.key)
        self._await_calls(funcs)

    def _await_calls(self, funcs: list[Func]) -> None:
        wrapped = {d for f in funcs if f.key in self.async_keys for d in f.decorators}
        returns_client = {f.key for f in funcs if f.returns_client}
        for func in funcs:
            for candidates, call in func.calls:
                if self.is_async(candidates):
                    func.module.await_nodes.add(call)
            if func.parent is not None and func.parent.key in wrapped:
                func.module.await_nodes.update(func.param_calls)
            for name, use in func.response_uses:
                sources = func.assigned.get(name, [])
                if any(
                    set(self._callees(c)) & returns_client
                    or (isinstance(call.func, cst.Attribute) and self._client_call(func, call))
                    for c, call in sources
                ):
                    func.module.await_nodes.add(use)
        for module in self.modules:
            for candidates, call in module.top_level_calls:
                if self.is_async(candidates):
                    module.report(call, "calls an async function at import time: can't await here")
            for owner, dotted, call in module.blocking:
                if owner.key in self.async_keys or self._called_from_async(owner):
                    module.report(call, f"{dotted}() {rules.BLOCKING_CALLS[dotted]}")

    @staticmethod
    def _client_call(func: Func, call: cst.Call) -> bool:
        assert isinstance(call.func, cst.Attribute)
        name = _last(call.func.value)
        return (
            call.func.attr.value in rules.CLIENT_METHODS
            and name is not None
            and (bool(_CLIENT.fullmatch(name)) or name in func.clients)
        )

    def _called_from_async(self, target: Func) -> bool:
        # A sync helper a view calls blocks the loop just the same.
        seen: set[str] = set()
        frontier = {target.key}
        while frontier:
            seen |= frontier
            callers = {
                f.key
                for f in self.funcs.values()
                if any(set(self._callees(c)) & frontier for c, _ in f.calls)
            }
            if callers & self.async_keys:
                return True
            frontier = callers - seen
        return False


def _prescan(project: Project, module: ModuleInfo) -> None:
    for stmt in module.tree.body:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if isinstance(small, cst.Assign) and isinstance(small.value, cst.Call):
                    factory = _last(small.value.func)
                    names = [
                        t.target.value for t in small.targets if isinstance(t.target, cst.Name)
                    ]
                    if factory in ("FlaskBridge", "QuartBridge"):
                        module.bridges.update(names)
                        project.bridges.update(f"{module.name}.{n}" for n in names)
                    elif factory in _APP_FACTORIES:
                        module.apps.update(names)
                        project.apps.update(f"{module.name}.{n}" for n in names)
