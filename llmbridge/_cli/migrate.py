"""``llmbridge migrate PATH...``: move a Flask app to Quart (and FlaskBridge to QuartBridge).

Prints a unified diff by default; ``--write`` applies it. Exit status, like
``ruff format --diff``: 0 when nothing needs changing (or ``--write`` applied the changes),
1 when a diff was printed, 2 on an error (one line on stderr). What the codemod can't do
is listed on stderr as ``file:line: reason`` and doesn't change the status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .main import CommandError

HELP = "rewrite a Flask app to Quart (FlaskBridge to QuartBridge); prints a diff, --write applies"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="modules or package directories"
    )
    parser.add_argument("--write", action="store_true", help="apply the changes in place")


def run(args: argparse.Namespace) -> int:
    """Migrate ``args.paths``; returns the exit status described in the module docstring."""
    try:
        import libcst  # noqa: F401
    except ImportError:
        raise ImportError('migrate needs libcst: pip install "llmbridge[migrate]"') from None
    from .._migrate import MigrationError, migrate

    try:
        outcome = migrate(args.paths)
    except MigrationError as exc:
        raise CommandError(str(exc)) from None
    for change in outcome.changes:
        if args.write:
            change.write()
            print(f"migrated {change.path}", file=sys.stderr)
        else:
            sys.stdout.write(change.diff())
    for finding in outcome.findings:
        print(f"{finding}", file=sys.stderr)
    if outcome.changes and not args.write:
        return 1
    return 0
