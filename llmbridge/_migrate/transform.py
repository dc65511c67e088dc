"""Pass two of the codemod: apply what :mod:`.project` decided to each module's tree.

Only the nodes that change are rebuilt, so comments, blank lines and formatting elsewhere
come through as they were; every rewrite checks whether it is already done (``async``
already there, a call already awaited), which is what makes a second run a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import libcst as cst
from libcst.codemod import CodemodContext
from libcst.codemod.visitors import AddImportsVisitor

from .model import CLI_HELPER, Func, ModuleInfo, dotted_name
from .project import Project
from .rules import EXTENSIONS, MODULES, RENAMES

__all__ = ["rewrite"]

_CLI_HELPER_SOURCE = f'''

def {CLI_HELPER}(fn):
    """Run the async click command ``fn`` in its app's context (added by ``llmbridge
    migrate``: click calls commands synchronously, and Flask's CLI pushed the context)."""

    @functools.wraps(fn)
    def command(*args, **kwargs):
        async def run():
            app = click.get_current_context().ensure_object(ScriptInfo).load_app()
            async with app.app_context():
                return await fn(*args, **kwargs)

        return asyncio.run(run())

    return command
'''
_BACKEND = """

@pytest.fixture
def anyio_backend():
    return "asyncio"  # Quart runs on asyncio (added by llmbridge migrate)
"""
_PYTESTMARK = "pytestmark = pytest.mark.anyio  # the migrated tests run under anyio's plugin\n"


def _paren(node: cst.BaseExpression) -> cst.BaseExpression:
    if isinstance(node, cst.Await) and not node.lpar:
        return node.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
    return node


class _Rewriter(cst.CSTTransformer):
    def __init__(self, project: Project, module: ModuleInfo, context: CodemodContext) -> None:
        super().__init__()
        self.p = project
        self.m = module
        self.context = context
        self.funcs: dict[cst.FunctionDef, Func] = {f.node: f for f in module.funcs}
        self.already: set[cst.CSTNode] = set()
        self.renames: dict[str, str] = {}
        for local, dotted in module.imports.items():
            mod, _, name = dotted.rpartition(".")
            if mod in MODULES and name in RENAMES and local == name:
                self.renames[local] = RENAMES[name]
            elif dotted in MODULES and local == dotted:
                self.renames[local] = MODULES[dotted]
        self.needs_helper = False
        self.needs_mark = False
        self.import_depth = 0

    # -- imports ----------------------------------------------------------------------

    def visit_Import(self, node: cst.Import) -> None:
        self.import_depth += 1

    def leave_Import(self, original_node: cst.Import, updated_node: cst.Import) -> cst.Import:
        self.import_depth -= 1
        names = []
        for alias in original_node.names:
            dotted = dotted_name(alias.name) or ""
            self._extension(original_node, dotted)
            if dotted in MODULES:
                alias = alias.with_changes(name=_name_node(MODULES[dotted]))
            names.append(alias)
        return updated_node.with_changes(names=names)

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        self.import_depth += 1

    def leave_ImportFrom(
        self, original_node: cst.ImportFrom, updated_node: cst.ImportFrom
    ) -> cst.ImportFrom:
        self.import_depth -= 1
        if original_node.module is None or original_node.relative:
            return updated_node
        dotted = dotted_name(original_node.module) or ""
        self._extension(original_node, dotted)
        if dotted not in MODULES:
            return updated_node
        names = original_node.names
        if not isinstance(names, cst.ImportStar):
            names = [
                alias.with_changes(name=cst.Name(RENAMES[alias.name.value]))
                if isinstance(alias.name, cst.Name) and alias.name.value in RENAMES
                else alias
                for alias in names
            ]
        return updated_node.with_changes(module=_name_node(MODULES[dotted]), names=names)

    def _extension(self, node: cst.CSTNode, dotted: str) -> None:
        top = dotted.partition(".")[0]
        if top in EXTENSIONS:
            self.m.report(node, EXTENSIONS[top])
        elif top.startswith("flask_"):
            self.m.report(
                node, f"{top} is a Flask extension: check that it works with Quart, or replace it"
            )

    # -- names ------------------------------------------------------------------------

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.Name:
        if self.import_depth == 0 and original_node.value in self.renames:
            return updated_node.with_changes(value=self.renames[original_node.value])
        return updated_node

    def leave_Arg(self, original_node: cst.Arg, updated_node: cst.Arg) -> cst.Arg:
        keyword = original_node.keyword
        if original_node in self.m.keyword_renames:
            keyword = cst.Name(self.m.keyword_renames[original_node])
        return updated_node.with_changes(keyword=keyword)

    def leave_Attribute(
        self, original_node: cst.Attribute, updated_node: cst.Attribute
    ) -> cst.BaseExpression:
        attr = original_node.attr
        if original_node in self.m.attr_renames:
            attr = cst.Name(self.m.attr_renames[original_node])
        elif (
            isinstance(original_node.value, cst.Name)
            and self.renames.get(original_node.value.value) in MODULES.values()
            and attr.value in RENAMES
        ):
            attr = cst.Name(RENAMES[attr.value])
        node = updated_node.with_changes(attr=attr, value=_paren(updated_node.value))
        return self._await(original_node, node)

    def leave_Subscript(
        self, original_node: cst.Subscript, updated_node: cst.Subscript
    ) -> cst.Subscript:
        return updated_node.with_changes(value=_paren(updated_node.value))

    # -- awaits -----------------------------------------------------------------------

    def visit_Await(self, node: cst.Await) -> None:
        self.already.add(node.expression)

    def _await(self, original: cst.CSTNode, node: cst.BaseExpression) -> cst.BaseExpression:
        if original in self.m.await_nodes and original not in self.already:
            return cst.Await(expression=node)
        return node

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        if original_node in self.m.prefix_calls:
            updated_node = updated_node.with_changes(args=[cst.Arg(cst.SimpleString('"FLASK"'))])
        return self._await(original_node, updated_node.with_changes(func=_paren(updated_node.func)))

    def leave_With(self, original_node: cst.With, updated_node: cst.With) -> cst.With:
        if original_node in self.m.async_withs:
            items: list[cst.WithItem] = []
            for original, item in zip(original_node.items, updated_node.items, strict=True):
                items.append(item)
                if original in self.m.client_withs:
                    # Flask's `with client:` keeps the last request's app context (and `g`);
                    # Quart's keeps only the request context, unless an app context encloses
                    # the requests: they then share it, as they shared Flask's.
                    context = cst.parse_expression(
                        f"{cst.Module([]).code_for_node(item.item)}.app.app_context()"
                    )
                    items[-1] = item.with_changes(
                        comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
                    )
                    items.append(cst.WithItem(context, comma=item.comma))
            return updated_node.with_changes(asynchronous=cst.Asynchronous(), items=items)
        return updated_node

    def leave_For(self, original_node: cst.For, updated_node: cst.For) -> cst.For:
        if original_node in self.m.async_fors:
            return updated_node.with_changes(asynchronous=cst.Asynchronous())
        return updated_node

    def leave_CompFor(self, original_node: cst.CompFor, updated_node: cst.CompFor) -> cst.CompFor:
        if original_node in self.m.async_fors:
            return updated_node.with_changes(asynchronous=cst.Asynchronous())
        return updated_node

    # -- functions --------------------------------------------------------------------

    def leave_FunctionDef(
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        func = self.funcs.get(original_node)
        if func is None or func.key not in self.p.async_keys:
            return updated_node
        node = updated_node
        if node.asynchronous is None:
            node = node.with_changes(asynchronous=cst.Asynchronous())
        if func.fixture and "anyio_backend" not in func.params:
            # anyio's plugin runs an async fixture only in a test that asks for a backend;
            # asking here lets sync tests use it too.
            params = [*node.params.params, cst.Param(cst.Name("anyio_backend"))]
            node = node.with_changes(params=node.params.with_changes(params=params))
        if func.cli and not any(
            isinstance(d.decorator, cst.Name) and d.decorator.value == CLI_HELPER
            for d in node.decorators
        ):
            self.needs_helper = True
            node = node.with_changes(
                decorators=[*node.decorators, cst.Decorator(cst.Name(CLI_HELPER))]
            )
        if (
            self.m.is_test
            and self.m.path.name != "conftest.py"
            and func.name.startswith("test")
            and (func.parent is None)
        ):
            self.needs_mark = True
        return node

    # -- module -----------------------------------------------------------------------

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        body = list(updated_node.body)
        extra: list[cst.BaseStatement] = []
        if self.needs_helper and CLI_HELPER not in self.m.defs:
            for module in ("asyncio", "functools", "click"):
                AddImportsVisitor.add_needed_import(self.context, module)
            AddImportsVisitor.add_needed_import(self.context, "quart.cli", "ScriptInfo")
            extra.extend(cst.parse_module(_CLI_HELPER_SOURCE).body)
        if self.needs_mark and "pytestmark" not in self.m.defs and not _assigns(body, "pytestmark"):
            AddImportsVisitor.add_needed_import(self.context, "pytest")
            extra.insert(0, cst.parse_statement(_PYTESTMARK))
        if self._needs_backend():
            AddImportsVisitor.add_needed_import(self.context, "pytest")
            extra.extend(cst.parse_module(_BACKEND).body)
        if not extra:
            return updated_node
        at = _after_imports(body)
        spaced = [extra[0].with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()])]
        spaced.extend(extra[1:])
        if at < len(body):
            following = body[at]
            blank = [cst.EmptyLine(), cst.EmptyLine()]
            body[at] = following.with_changes(leading_lines=[*blank, *following.leading_lines])
            # Keep at most two blank lines: drop the ones the statement had before.
            lines = list(body[at].leading_lines)
            while len(lines) > 2 and lines[2].comment is None and lines[2].indent:
                del lines[2]
            body[at] = body[at].with_changes(leading_lines=lines)
        return updated_node.with_changes(body=[*body[:at], *spaced, *body[at:]])

    def _needs_backend(self) -> bool:
        # anyio's plugin would run each async test on every backend it finds; Quart needs
        # asyncio. One fixture in the conftest (or in the test module if there is none).
        if "anyio_backend" in self.m.defs or not self.m.is_test:
            return False
        if self.m.path.name == "conftest.py":
            return any(f.key in self.p.async_keys for f in self.m.funcs if f.fixture) or (
                self._async_tests_below()
            )
        conftests = {
            m.path.resolve().parent for m in self.p.modules if m.path.name == "conftest.py"
        }
        here = self.m.path.resolve().parent
        return self.needs_mark and not any(d == here or d in here.parents for d in conftests)

    def _async_tests_below(self) -> bool:
        here = self.m.path.resolve().parent
        return any(
            f.key in self.p.async_keys and f.name.startswith("test") and f.parent is None
            for m in self.p.modules
            if m.is_test and (here == m.path.resolve().parent or here in m.path.resolve().parents)
            for f in m.funcs
        )


def _name_node(dotted: str) -> cst.Attribute | cst.Name:
    expr = cst.parse_expression(dotted)
    assert isinstance(expr, cst.Attribute | cst.Name)
    return expr


def _assigns(body: Sequence[cst.BaseStatement], name: str) -> bool:
    for stmt in body:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if isinstance(small, cst.Assign) and any(
                    isinstance(t.target, cst.Name) and t.target.value == name for t in small.targets
                ):
                    return True
    return False


def _after_imports(body: Sequence[cst.BaseStatement]) -> int:
    at = 0
    for index, stmt in enumerate(body):
        if isinstance(stmt, cst.SimpleStatementLine) and all(
            isinstance(s, cst.Import | cst.ImportFrom) for s in stmt.body
        ):
            at = index + 1
        elif index == 0 and isinstance(stmt, cst.SimpleStatementLine):
            at = 1  # a docstring
        else:
            break
    return at


def rewrite(project: Project, module: ModuleInfo) -> str:
    """The migrated source of ``module`` (the project must be analysed)."""
    context = CodemodContext()
    rewriter = _Rewriter(project, module, context)
    tree = module.tree.visit(rewriter)
    if rewriter.needs_helper or rewriter.needs_mark:
        tree = AddImportsVisitor(context).transform_module(tree)
    return tree.code
