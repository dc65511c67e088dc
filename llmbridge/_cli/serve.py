"""``llmbridge serve module:engine --socket PATH``: the host's one engine process.

Where no gunicorn arbiter starts it (``uvicorn --workers N``, systemd, a container),
this command runs the engine that every worker on the host shares. ``module:engine``
names an engine, a pipeline, or a factory returning one; ``LLMBRIDGE_ENGINE_SOCKET``
pointed at ``PATH`` in the workers' environment makes their
:func:`llmbridge.gunicorn.shared_engine` connect to it. A crashed engine process is
started again (``--no-restart`` to run one only); SIGTERM stops it, exit status 0.
"""

from __future__ import annotations

import argparse
import os
import sys

from .main import CommandError

HELP = "run the host's shared engine process on a Unix socket"

#: The default of ``--keep-alive``, so a gunicorn config's EngineProcess needs no option.
KEEP_ALIVE_ENV = "LLMBRIDGE_ENGINE_KEEP_ALIVE"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``llmbridge serve``."""
    parser.add_argument("target", help="module:attribute: an engine, a pipeline, or a factory")
    parser.add_argument(
        "--socket",
        default=None,
        help="the Unix socket to serve (default: $LLMBRIDGE_ENGINE_SOCKET, else a private one)",
    )
    parser.add_argument(
        "--group", default=None, help="let this group connect too (mode 0660; default 0600)"
    )
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=10.0,
        help="seconds streams may run on after SIGTERM (default 10)",
    )
    parser.add_argument(
        "--keep-alive",
        type=float,
        default=float(os.environ.get(KEEP_ALIVE_ENV) or 60.0),
        help=f"seconds an idle client connection stays open (default ${KEEP_ALIVE_ENV}, else 60)",
    )
    parser.add_argument(
        "--no-restart", action="store_true", help="run one engine process; don't restart it"
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started this one dies (for gunicorn's hooks)",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")


def run(args: argparse.Namespace) -> int:
    """Serve (supervised, unless ``--no-restart``) until SIGTERM. Blocks."""
    from .._host.process import default_socket_path, exit_with_parent, serve_once, supervise
    from .._host.wire import SOCKET_ENV

    path = args.socket or os.environ.get(SOCKET_ENV) or default_socket_path()
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise CommandError(f"the socket's directory does not exist: {path}")
    if args.exit_with_parent:
        exit_with_parent()
    if args.no_restart:
        try:
            return serve_once(
                args.target,
                path,
                group=args.group,
                graceful_timeout=args.graceful_timeout,
                keep_alive=args.keep_alive,
                log_level=args.log_level,
            )
        except (ValueError, ImportError, AttributeError, OSError) as exc:
            raise CommandError(str(exc)) from exc
    child = [sys.executable, "-m", "llmbridge", "serve", args.target, "--socket", path]
    child += ["--no-restart", "--exit-with-parent", "--log-level", args.log_level]
    child += ["--graceful-timeout", str(args.graceful_timeout)]
    child += ["--keep-alive", str(args.keep_alive)]
    if args.group is not None:
        child += ["--group", args.group]
    return supervise(child)
