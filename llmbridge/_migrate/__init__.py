"""``llmbridge migrate``: rewrite a Flask app (and its ``FlaskBridge`` use) to Quart.

A libcst codemod in two passes over every file given: :mod:`.collect` and :mod:`.project`
decide what must become ``async`` and what must be awaited (across modules: a call into a
function another file made async is awaited too), :mod:`.transform` applies it. The rules
are in :mod:`.rules`. What can't be done mechanically comes back as :class:`Finding` lines.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .model import Finding
from .project import Project
from .transform import rewrite

__all__ = ["Change", "Finding", "MigrationError", "Outcome", "migrate"]

_SKIP_DIRS = frozenset({".git", ".hg", ".tox", ".venv", "venv", "__pycache__", "node_modules"})


class MigrationError(Exception):
    """A path that can't be read or parsed: one line, for the command to print."""


@dataclass(frozen=True)
class Change:
    """One file's migrated text."""

    path: Path
    before: str
    after: str

    def diff(self) -> str:
        """A unified diff: ``a/PATH`` → ``b/PATH`` for a relative path (as ``git diff``,
        so ``patch -p1`` applies it), the path itself twice for an absolute one."""
        before, after = (str(self.path),) * 2
        if not self.path.is_absolute():
            before, after = f"a/{self.path}", f"b/{self.path}"
        return "".join(
            difflib.unified_diff(
                self.before.splitlines(keepends=True),
                self.after.splitlines(keepends=True),
                fromfile=before,
                tofile=after,
            )
        )

    def write(self) -> None:
        """Replace the file's contents (newlines kept as they are). Blocks on file I/O."""
        with self.path.open("w", encoding="utf-8", newline="") as file:
            file.write(self.after)


@dataclass
class Outcome:
    """What :func:`migrate` found: the files that change, and what it can't do."""

    changes: list[Change] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def _python_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for found in sorted(path.rglob("*.py")):
                if not _SKIP_DIRS & set(found.relative_to(path).parts[:-1]):
                    yield found
        elif path.is_file():
            yield path
        else:
            raise MigrationError(f"{path}: no such file or directory")


def migrate(paths: Iterable[Path]) -> Outcome:
    """Migrate every ``.py`` file under ``paths`` together (in memory: nothing is written).

    Blocks on reading the files; raises :class:`MigrationError` for a missing path, a file
    that isn't UTF-8 or a syntax error.
    """
    import libcst

    project = Project()
    for path in _python_files(paths):
        try:
            with path.open(encoding="utf-8", newline="") as file:
                source = file.read()
            project.add(path, source)
        except (OSError, UnicodeDecodeError) as exc:
            raise MigrationError(f"{path}: can't read it: {exc}") from None
        except libcst.ParserSyntaxError as exc:
            raise MigrationError(
                f"{path}:{exc.raw_line}: not valid Python: {exc.message}"
            ) from None
    project.analyse()
    outcome = Outcome()
    for module in project.modules:
        after = rewrite(project, module)
        if after != module.source:
            outcome.changes.append(Change(module.path, module.source, after))
        outcome.findings.extend(module.findings)
    outcome.findings.sort()
    return outcome
