"""How the OpenAI tests start each real server over ``tests/openai_apps.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from support import PYTHON, Server, free_port, run_server

#: Server kind -> (argv, the ``OPENAI_APP`` it serves).
COMMANDS: dict[str, tuple[list[str], str]] = {
    "werkzeug": ([PYTHON, "tests/openai_apps.py"], "flask"),
    "gunicorn": (
        [PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-w", "1",
         "-b", "127.0.0.1:{port}", "openai_apps:app"],
        "flask",
    ),
    "uvicorn": (
        [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
         "--no-access-log", "openai_apps:asgi"],
        "flask",
    ),
    "hypercorn": (
        [PYTHON, "-m", "hypercorn", "-w", "0", "--bind", "127.0.0.1:{port}", "openai_apps:app"],
        "quart",
    ),
}  # fmt: skip


@contextlib.contextmanager
def serve(kind: str, env: Mapping[str, str] | None = None) -> Iterator[Server]:
    """The OpenAI test app under the server ``kind`` (see :data:`COMMANDS`)."""
    args, app = COMMANDS[kind]
    port = free_port()
    full = {"OPENAI_APP": app, "PORT": str(port), **(env or {})}
    with run_server(args, port=port, env=full) as server:
        yield server
