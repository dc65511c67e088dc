"""``llmbridge`` / ``python -m llmbridge``: parse the command line, run one subcommand.

Errors a user can fix (a missing extra, a bad path, a port in use) end the command with
one clear line on stderr and exit status 2, never a traceback; ``Ctrl-C`` exits with 130
without one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["COMMANDS", "CommandError", "checkout", "main"]

#: Where to get a clone, for the commands that need one (``demo``, ``bench``).
CLONE = "git clone https://github.com/llmbridge/llmbridge && cd llmbridge"

#: The subcommands, in the order ``--help`` lists them: each is ``llmbridge._cli.<name>``.
COMMANDS = ("demo", "migrate", "serve", "bench")


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit status 2."""


def checkout(marker: str, *, what: str) -> Path:
    """The root of the clone this command runs from: the one holding the imported
    ``llmbridge`` package (an editable install), else the current directory or one
    above it; it must contain ``marker``. Raises :class:`CommandError` saying ``what``
    needs a clone when there is none (the wheel has no ``examples/`` or ``benchmarks/``).
    """
    package_root = Path(__file__).resolve().parents[2]
    here = Path.cwd().resolve()
    for candidate in (package_root, here, *here.parents):
        if (candidate / marker).exists() and (candidate / "llmbridge").is_dir():
            return candidate
    raise CommandError(
        f"{what}, which only a clone of the repository has: {CLONE} && "
        f'pip install -e ".[dev]", then run it there'
    )


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"llmbridge._cli.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"llmbridge._cli.{name}":
            return None  # not part of this installation
        raise


def _parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog="llmbridge",
        description="Correct, concurrent LLM calls from Flask and Quart apps.",
        epilog="`llmbridge COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, ModuleType] = {}
    for name in COMMANDS:
        module = _module(name)
        if module is None:
            continue
        modules[name] = module
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
    return parser, modules


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmbridge")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser, modules = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status: int = modules[args.command].run(args)
    except CommandError as exc:
        print(f"llmbridge {args.command}: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        # A missing optional dependency: its message names the extra to install.
        print(f"llmbridge {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A path that isn't there, a port that can't be bound, a pipe that closed.
        print(f"llmbridge {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status
