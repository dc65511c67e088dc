"""One engine per host, shared by every worker: one model copy, batching across workers.

In ``gunicorn.conf.py``::

    from llmbridge.gunicorn import EngineProcess

    engine_process = EngineProcess("myapp.engines:make_engine")
    on_starting = engine_process.on_starting  # starts it (and restarts it if it dies)
    on_exit = engine_process.on_exit  # stops it, after the workers drained
    post_fork = engine_process.post_fork  # a worker whose arbiter was killed stops

and in the app, the same code whether the engine is shared or not::

    from llmbridge.gunicorn import shared_engine

    engine = shared_engine(make_engine)  # an EngineClient under that gunicorn,
    bridge = FlaskBridge(app, engine)    # a local Engine under `flask run` and in tests

Without gunicorn's hooks (``uvicorn --workers N``), run the engine process yourself with
``python -m llmbridge serve myapp.engines:make_engine --socket PATH`` and set
``LLMBRIDGE_ENGINE_SOCKET=PATH`` for the workers. See ``docs/howto/shared_engine.md``.

Nothing here imports gunicorn: the hooks take the arbiter and ignore it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ._core.engine import Submitter
from ._host.client import EngineClient
from ._host.process import EngineProcess
from ._host.wire import SOCKET_ENV as _SOCKET_ENV

__all__ = ["EngineClient", "EngineProcess", "shared_engine"]


def shared_engine(
    factory: Callable[[], Submitter], /, *, socket_path: str | None = None
) -> Submitter:
    """The host's shared engine if one is configured, else ``factory()``.

    ``socket_path`` (default: the ``LLMBRIDGE_ENGINE_SOCKET`` environment variable) names
    the engine process's socket: set, this returns an :class:`EngineClient` for it and
    never calls ``factory`` (no model is loaded in this process); unset, it returns
    ``factory()``, a local engine. Inside the engine process itself the variable is
    unset, so a module that does ``engine = shared_engine(make_engine)`` can also be the
    target of ``llmbridge serve module:engine``. Never blocks (the client connects on
    first use); raises ``ImportError`` naming the extra if httpx is missing.
    """
    path = socket_path or os.environ.get(_SOCKET_ENV)
    if path:
        return EngineClient(path)
    return factory()
