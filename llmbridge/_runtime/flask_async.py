"""Flask's async views on the process's one background loop instead of a loop per call.

Flask runs ``async def`` views, error handlers and hooks through ``app.async_to_sync``,
which by default is asgiref's ``async_to_sync``: a fresh event loop on a fresh thread
for every call. Loop-bound objects created once (an ``httpx.AsyncClient``, an
``asyncio.Semaphore``, ``openai.AsyncOpenAI``) then break on the next request.

Overriding ``app.async_to_sync`` is Flask's documented hook for running coroutines
elsewhere. :func:`loop_async_to_sync` runs them as tasks on
:class:`~llmbridge._runtime.loop.BackgroundLoop` and keeps what asgiref's version
promises, through asgiref's public API only:

* the coroutine runs in a copy of the caller's :mod:`contextvars` context (Flask's
  request and app context included), and what it sets is carried back to the caller;
* thread-sensitive ``sync_to_async`` calls inside it run on the calling request thread:
  the thread idles in an asgiref ``CurrentThreadExecutor`` while it waits, and the task
  runs inside ``ThreadSensitiveContext(executor=...)`` pointing at it;
* called inside an ``except`` block (an async error handler), the coroutine sees the
  same ``sys.exc_info()``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import sys
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

from .loop import BackgroundLoop

__all__ = ["loop_async_to_sync"]

P = ParamSpec("P")
T = TypeVar("T")

_MISSING: Any = object()


def _asgiref() -> tuple[Any, Any]:
    try:
        from asgiref.current_thread_executor import CurrentThreadExecutor
        from asgiref.sync import ThreadSensitiveContext
    except ImportError:  # pragma: no cover - asgiref ships with the flask extra
        raise ImportError('async views need asgiref: pip install "llmbridge[flask]"') from None
    if "executor" not in inspect.signature(ThreadSensitiveContext).parameters:
        raise ImportError('async views need asgiref>=3.13: pip install -U "llmbridge[flask]"')
    return CurrentThreadExecutor, ThreadSensitiveContext


def loop_async_to_sync(
    func: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, T]:
    """A blocking callable that runs ``func`` on the background loop and waits for it.

    A drop-in for Flask's ``App.async_to_sync``: the calling thread blocks (and runs any
    thread-sensitive ``sync_to_async`` work the coroutine sends back to it) until the
    coroutine ends; its contextvars, including Flask's request and app context, are
    visible inside and changes made inside are visible after. Raises what ``func``
    raises. Raises ``RuntimeError`` on a running event loop (await ``func`` there).
    Thread-safe; fork-safe (a forked child gets a loop of its own).
    """
    current_thread_executor, thread_sensitive_context = _asgiref()

    @functools.wraps(func)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "async_to_sync() blocks and would stall this event loop: await the "
                "coroutine function directly"
            )
        here = current_thread_executor(None)
        context = contextvars.copy_context()
        outcome: Future[T] = Future()
        exc_info = sys.exc_info()[1]

        async def main() -> T:
            async with thread_sensitive_context(executor=here):
                if exc_info is None:
                    return await func(*args, **kwargs)
                # Flask calls error handlers inside ``except``: keep sys.exc_info().
                try:
                    raise exc_info
                except BaseException:
                    return await func(*args, **kwargs)

        def start() -> None:
            task = asyncio.get_running_loop().create_task(main(), context=context)
            task.add_done_callback(functools.partial(_settle, outcome))

        BackgroundLoop.current().call_soon(start)
        try:
            here.run_until_future(outcome)
        finally:
            _carry_back(context)
        return outcome.result()

    return call


def _settle(outcome: Future[T], task: asyncio.Task[T]) -> None:
    if task.cancelled():
        outcome.cancel()
    elif (error := task.exception()) is not None:
        outcome.set_exception(error)
    else:
        outcome.set_result(task.result())


def _carry_back(context: contextvars.Context) -> None:
    # What the coroutine set in its copy becomes visible to the caller's later code
    # (Flask's sync after_request hooks, the next async hook).
    for var, value in context.items():
        if var.get(_MISSING) is not value:
            var.set(value)
