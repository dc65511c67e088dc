"""Flask's async views on the process's one background loop instead of a loop per call.

Flask runs ``async def`` views, error handlers and hooks through ``app.async_to_sync``,
which by default is asgiref's ``async_to_sync``: a fresh event loop on a fresh thread
for every call. Loop-bound objects created once (an ``httpx.AsyncClient``, an
``asyncio.Semaphore``, ``openai.AsyncOpenAI``) then break on the next request.

:func:`loop_async_to_sync` keeps asgiref for everything it does well (copying
contextvars in and carrying changes back, running thread-sensitive ``sync_to_async``
calls on the request thread, re-raising inside ``except`` blocks) and only tells it
which loop to use: asgiref already runs the coroutine on an existing loop when it is
called from a thread that loop handed work to. We mark the calling thread that way,
pointing at :func:`llmbridge._portal.background_loop`, for the duration of the call.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from .loop import background_loop

__all__ = ["loop_async_to_sync"]

P = ParamSpec("P")
T = TypeVar("T")

_MISSING = object()


def _asgiref() -> Any:
    try:
        from asgiref import sync
    except ImportError:  # pragma: no cover - asgiref ships with the flask extra
        raise ImportError('async views need asgiref: pip install "llmbridge[flask]"') from None
    return sync


def loop_async_to_sync(
    func: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, T]:
    """A blocking callable that runs ``func`` on the background loop and waits for it.

    A drop-in for Flask's ``App.async_to_sync``: the calling thread blocks (and runs any
    thread-sensitive ``sync_to_async`` work the coroutine sends back to it) until the
    coroutine ends; its contextvars, including Flask's request and app context, are
    visible inside and changes made inside are visible after. Raises what ``func``
    raises. Never call it on a running event loop (``RuntimeError``, as asgiref).
    Thread-safe; fork-safe (a forked child gets a loop of its own).
    """
    sync = _asgiref()

    @functools.wraps(func)
    async def on_the_loop(*args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        if loop is not background_loop():
            # asgiref stopped honouring the thread's main loop: fail loudly rather than
            # silently falling back to a loop per call.
            raise RuntimeError("async view did not run on llmbridge's background loop")
        return await func(*args, **kwargs)

    runner = sync.AsyncToSync(on_the_loop)
    local = sync.SyncToAsync.threadlocal

    @functools.wraps(func)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        loop = background_loop()
        saved = (
            getattr(local, "main_event_loop", _MISSING),
            getattr(local, "main_event_loop_pid", _MISSING),
        )
        local.main_event_loop = loop
        local.main_event_loop_pid = os.getpid()
        try:
            result: T = runner(*args, **kwargs)
            return result
        finally:
            for name, value in zip(("main_event_loop", "main_event_loop_pid"), saved, strict=True):
                if value is _MISSING:
                    delattr(local, name)
                else:
                    setattr(local, name, value)

    return call
