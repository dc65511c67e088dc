"""Pass one of the codemod, per module: what each function awaits, calls and is.

A visitor records, by node, what Quart makes a coroutine (request body accessors, the
template and response helpers, the test client, FlaskBridge calls) and which calls go to
functions of the migrated files; :class:`~.project.Project` then settles what is async.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import libcst as cst

from .model import (
    APP_FACTORIES,
    APP_NAMES,
    CLI_HELPER,
    CLIENT,
    HTTP_METHODS,
    VIEW_CLASSES,
    Func,
    ModuleInfo,
    call_of,
    dotted_name,
    last_name,
)
from .rules import (
    ASYNC_CONTEXTS,
    ASYNC_HELPERS,
    BLOCKING_CALLS,
    BRIDGE_METHODS,
    CLIENT_METHODS,
    HOOK_DECORATORS,
    HOOK_REGISTRATIONS,
    REQUEST_ASYNC_ATTRS,
    REQUEST_ASYNC_METHODS,
    RESOURCE_OPENERS,
    RESPONSE_ASYNC_ATTRS,
    RESPONSE_ASYNC_METHODS,
)

if TYPE_CHECKING:
    from .project import Project

__all__ = ["FIXTURE", "Collector"]

#: Prefix of a callee candidate ``obj.method`` where obj is a test's parameter (a fixture).
FIXTURE = "*fixture:"
#: A body that is text or bytes already: Quart's data= takes it as it is.
STRINGS = (cst.SimpleString, cst.ConcatenatedString, cst.FormattedString)
#: Clients whose ``client.get()`` is not a Flask test client's.
HTTP_CLIENTS = ("httpx.", "requests.", "aiohttp.", "urllib3.")


class Collector(cst.CSTVisitor):
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
        self.callees: set[cst.Attribute] = set()

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
            if isinstance(base, cst.Name) and self.stack:
                # obj.method(): a method of a migrated class when obj was built from it here
                # (obj = Cls(...)), or is a fixture that returns one (settled later).
                func = self.stack[-1]
                method = node.attr.value
                if base.value in func.assigned:
                    return [
                        f"{c}.{method}" for found, _ in func.assigned[base.value] for c in found
                    ]
                if base.value in func.params:
                    return [f"{FIXTURE}{base.value}.{method}"]
        return []

    def dotted(self, node: cst.BaseExpression) -> str | None:
        found = self.candidates(node)
        return found[0] if found and not found[0].startswith(FIXTURE) else None

    def is_flask(self, node: cst.BaseExpression, names: frozenset[str] | set[str]) -> bool:
        dotted = self.dotted(node)
        if dotted is None:
            return False
        module, _, name = dotted.rpartition(".")
        return module in ("flask", "quart") and name in names

    def is_request(self, node: cst.BaseExpression) -> bool:
        return self.is_flask(node, {"request"})

    def is_app(self, node: cst.BaseExpression) -> bool:
        name = last_name(node)
        if name is None:
            return False
        return (
            name in APP_NAMES
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
        name = last_name(node)
        if name is None:
            return False
        func = self.stack[-1] if self.stack else None
        if func is not None and name in func.not_clients:
            return False
        return bool(CLIENT.fullmatch(name)) or (func is not None and name in func.clients)

    def is_client_request(self, node: cst.BaseExpression) -> bool:
        call = call_of(node)
        return (
            call is not None
            and isinstance(call.func, cst.Attribute)
            and call.func.attr.value in CLIENT_METHODS
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
        bases = {last_name(arg.value) for arg in node.bases}
        self.classes.append((node.name.value, bool(bases & VIEW_CLASSES)))
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
        if in_class is not None and self.classes[-1][1] and node.name.value in HTTP_METHODS:
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
            and target.attr.value in HOOK_DECORATORS
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
        call = call_of(value)
        if call is not None and not self.stack:
            factory = last_name(call.func)
            if factory in ("FlaskBridge", "QuartBridge"):
                self.m.bridges.update(names)
                self.project.bridges.update(f"{self.m.name}.{n}" for n in names)
            if factory in APP_FACTORIES:
                self.m.apps.update(names)
                self.project.apps.update(f"{self.m.name}.{n}" for n in names)
        if call is None or not self.stack:
            return
        func = self.stack[-1]
        if (self.dotted(call.func) or "").startswith(HTTP_CLIENTS):
            func.not_clients.update(names)
        if isinstance(call.func, cst.Attribute):
            attr = call.func.attr.value
            if attr == "submit" and self.is_bridge(call.func.value):
                func.streams.update(names)
            elif attr == "test_client":
                func.clients.update(names)
            elif last_name(call.func) in APP_FACTORIES:
                self.m.apps.update(names)
        for name in names:
            func.assigned.setdefault(name, []).append((self.candidates(call.func), call))

    def visit_Return(self, node: cst.Return) -> None:
        if self.stack and node.value is not None:
            call = call_of(node.value)
            if call is not None:
                if self.is_client_request(call):
                    self.stack[-1].returns_client = True
                self.stack[-1].returned_calls.append(self.candidates(call.func))

    def visit_For(self, node: cst.For) -> None:
        self._loop(node)

    def visit_CompFor(self, node: cst.CompFor) -> None:
        self._loop(node)  # [chunk for chunk in bridge.stream(p)] -> async for, too

    def _loop(self, node: cst.For | cst.CompFor) -> None:
        it = node.iter
        call = call_of(it)
        bridge_stream = (
            call is not None
            and isinstance(call.func, cst.Attribute)
            and call.func.attr.value in ("stream", "astream")
            and self.is_bridge(call.func.value)
        )
        named_stream = (
            isinstance(it, cst.Name) and bool(self.stack) and it.value in self.stack[-1].streams
        )
        if bridge_stream or named_stream:
            if call is not None:
                self.for_iters.add(call)  # iterated, so not awaited
            if node.asynchronous is None:
                self.m.async_fors.add(node)
                if self.stack:
                    self.stack[-1].awaits = True

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
        call = call_of(expr)
        func = self.stack[-1] if self.stack else None
        if call is not None and (self.dotted(call.func) or "").startswith(HTTP_CLIENTS):
            if alias and func is not None:
                func.not_clients.add(alias)  # with httpx.Client() as client: not Flask's
            return False
        if call is not None and isinstance(call.func, cst.Attribute):
            attr = call.func.attr.value
            if attr in RESOURCE_OPENERS:
                self.awaited(call)
                self.with_items.add(call)
                if alias and func is not None:
                    func.files.add(alias)
                return True
            if attr in ASYNC_CONTEXTS:
                if attr == "test_client" and alias and func is not None:
                    func.clients.add(alias)
                return True
        if isinstance(expr, cst.Await):
            inner = call_of(expr.expression)
            if inner is not None and last_name(inner.func) in RESOURCE_OPENERS:
                if alias and func is not None:
                    func.files.add(alias)
                return True
        if self.is_client(expr) and not isinstance(expr, cst.Call):
            self.client_withs.append(item)
            return True
        return False

    # -- expressions ------------------------------------------------------------------

    def visit_Attribute(self, node: cst.Attribute) -> None:
        if node in self.callees:
            return  # reply.json(): a method (httpx's), not Flask's json property
        attr = node.attr.value
        if attr in REQUEST_ASYNC_ATTRS and self.is_request(node.value):
            self.awaited(node)
        elif self.m.is_test and attr in RESPONSE_ASYNC_ATTRS:
            self._response_use(node.value, node)

    def _response_use(self, value: cst.BaseExpression, node: cst.CSTNode) -> None:
        if self.is_client_request(value):
            self.awaited(node)
        elif isinstance(value, cst.Name) and self.stack:
            self.stack[-1].response_uses.append((value.value, node))

    def visit_Call(self, node: cst.Call) -> None:
        func = self.stack[-1] if self.stack else None
        callee = node.func
        if isinstance(callee, cst.Attribute):
            self.callees.add(callee)
        if isinstance(callee, cst.Attribute) and self._attribute_call(node, callee, func):
            return
        if self.is_flask(callee, ASYNC_HELPERS):
            self.awaited(node)
            return
        dotted = self.dotted(callee)
        if dotted in BLOCKING_CALLS and func is not None:
            self.m.blocking.append((func, dotted, node))
        if dotted in ("monkeypatch.setattr",) or (
            isinstance(callee, cst.Attribute)
            and callee.attr.value == "setattr"
            and last_name(callee.value) == "monkeypatch"
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
        if attr in REQUEST_ASYNC_METHODS and self.is_request(value):
            self.awaited(node)
            return True
        if attr in BRIDGE_METHODS and self.is_bridge(value):
            new, await_it = BRIDGE_METHODS[attr]
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
        if attr in RESOURCE_OPENERS and node not in self.with_items:
            self.awaited(node)
            return True
        if self.m.is_test:
            if attr in CLIENT_METHODS and self.is_client(value):
                self.awaited(node)
                for arg in node.args:
                    # Flask's client form-encodes a dict passed as data=; Quart's takes form=.
                    if arg.keyword is not None and arg.keyword.value == "data":
                        if isinstance(arg.value, cst.Dict):
                            self.m.keyword_renames[arg] = "form"
                        elif not isinstance(arg.value, STRINGS) and not (
                            isinstance(arg.value, cst.Call)
                            and last_name(arg.value.func) in ("dumps", "encode")
                        ):
                            self.m.report(
                                arg,
                                "data= is raw bytes in Quart's test client: pass form= "
                                "for a form, json= for JSON",
                            )
                return True
            if attr in RESPONSE_ASYNC_METHODS:
                self._response_use(value, node)
                return True
        if attr == "from_prefixed_env" and not node.args:
            # Quart reads QUART_*: keep reading the variables the Flask app was given.
            self.m.prefix_calls.add(node)
        if attr in HOOK_REGISTRATIONS and self.is_app(value):
            self._registration(node, HOOK_REGISTRATIONS[attr], hook=True)
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
        found = self.candidates(arg)
        if not found and isinstance(arg, cst.Name) and not self.stack:
            found = [f"{self.m.name}.{arg.value}"]
        elif not found and isinstance(arg, cst.Name):
            # Registered before the module defines it (create_app above the views).
            found = [f"{self.stack[-1].key}.{arg.value}", f"{self.m.name}.{arg.value}"]
        self.project.registrations.append((found, hook))

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
