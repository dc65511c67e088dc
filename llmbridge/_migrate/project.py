"""Pass one over the whole set of files: what becomes async is a fixpoint.

A function is async if it is a view, hook or error handler, if it awaits something Quart
made a coroutine, or if it calls a function that became async (in any of the files: a call
into another module counts); a decorator's wrapper is async when what it wraps is.
"""

from __future__ import annotations

from pathlib import Path

import libcst as cst

from .collect import FIXTURE, Collector
from .model import (
    APP_FACTORIES,
    ASYNC_DUNDERS,
    CLIENT,
    Func,
    ModuleInfo,
    dotted_name,
    last_name,
    module_name,
)
from .rules import BLOCKING_CALLS, CLIENT_METHODS

__all__ = ["Project"]


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
        self.native: set[str] = set()

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
            module.wrapper.visit(Collector(self, module))
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
            if key.startswith(FIXTURE):
                name, _, method = key[len(FIXTURE) :].partition(".")
                for func in self.funcs.values():
                    if func.fixture and func.name == name:
                        out.extend(f"{c}.{method}" for found in func.returned_calls for c in found)
            else:
                out.append(key)
        return out

    def is_async(self, candidates: list[str]) -> bool:
        """Whether a call to one of ``candidates`` must be awaited: it calls a function the
        migration makes async. A call to one that was async already is left as written:
        the code already handles that coroutine (``asyncio.run(main())``)."""
        return any(
            (k in self.async_keys and k not in self.native) or k in self.awaitables
            for k in self._callees(candidates)
        )

    def _settle(self) -> None:
        funcs = list(self.funcs.values())
        self.native = {f.key for f in funcs if f.node.asynchronous is not None}
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
            if func.key in self.async_keys and dunder and name not in ASYNC_DUNDERS:
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
                    module.report(call, f"{dotted}() {BLOCKING_CALLS[dotted]}")

    @staticmethod
    def _client_call(func: Func, call: cst.Call) -> bool:
        assert isinstance(call.func, cst.Attribute)
        name = last_name(call.func.value)
        return (
            call.func.attr.value in CLIENT_METHODS
            and name is not None
            and (bool(CLIENT.fullmatch(name)) or name in func.clients)
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
                    factory = last_name(small.value.func)
                    names = [
                        t.target.value for t in small.targets if isinstance(t.target, cst.Name)
                    ]
                    if factory in ("FlaskBridge", "QuartBridge"):
                        module.bridges.update(names)
                        project.bridges.update(f"{module.name}.{n}" for n in names)
                    elif factory in APP_FACTORIES:
                        module.apps.update(names)
                        project.apps.update(f"{module.name}.{n}" for n in names)
