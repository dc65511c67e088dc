"""The process-wide background event loop, for work that must not run on a caller's loop.

Flask async views, policies with async I/O (Redis) and other bridges share one
long-lived asyncio loop per process, on a daemon thread. It starts on first use and
again, fresh, in a forked child.

Why not anyio's ``start_blocking_portal``: its context manager must be exited to stop
the loop, and a forked child inherits the parent's un-exited manager, whose clean-up
then waits forever for a loop thread that stayed in the parent. A bare daemon thread
running ``loop.run_forever()`` has nothing to clean up in the child, and
``asyncio.run_coroutine_threadsafe`` is the whole of what we need from a portal.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar, cast

__all__ = ["Portal", "background_loop", "background_portal", "spawn"]

T = TypeVar("T")


class Portal:
    """Calls into one event loop running on its own daemon thread.

    Thread-safe. :meth:`call` blocks the calling thread and must not be used from the
    loop's own thread; :meth:`start_task_soon` never blocks.
    """

    def __init__(self, name: str = "llmbridge-loop") -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name=name, daemon=True)
        self.thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    def start_task_soon(self, fn: Callable[..., Awaitable[T] | T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the loop (awaited if it returns an awaitable); return a
        :class:`concurrent.futures.Future` for its result. Never blocks."""
        return asyncio.run_coroutine_threadsafe(_invoke(fn, args), self.loop)

    def call(self, fn: Callable[..., Awaitable[T] | T], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop and block until it returns; re-raise its error.

        Raises ``RuntimeError`` if called from the loop's own thread (it would deadlock).
        """
        if threading.get_ident() == self.thread.ident:
            raise RuntimeError("Portal.call() from the portal's own loop would deadlock")
        return self.start_task_soon(fn, *args).result()


async def _invoke(fn: Callable[..., Awaitable[T] | T], args: tuple[Any, ...]) -> T:
    result = fn(*args)
    if inspect.isawaitable(result):
        return cast(T, await result)
    return result


_lock = threading.Lock()
_portal: Portal | None = None
_pid = os.getpid()


def background_portal() -> Portal:
    """The process's background :class:`Portal`. Starts on first use; thread-safe;
    fork-safe (a child gets a fresh loop on first use)."""
    global _portal, _pid
    portal = _portal
    if portal is not None and _pid == os.getpid():
        return portal
    with _lock:
        if _portal is None or _pid != os.getpid():
            _portal = Portal()
            _pid = os.getpid()
        return _portal


def background_loop() -> asyncio.AbstractEventLoop:
    """The background portal's event loop (to schedule work without waiting for it)."""
    return background_portal().loop


def spawn(coro: Coroutine[Any, Any, T]) -> Future[T]:
    """Run ``coro`` on the background loop and return a :class:`concurrent.futures.Future`.

    Never blocks, from any thread or event loop (including the background loop).
    """
    return asyncio.run_coroutine_threadsafe(coro, background_loop())


def _after_fork_in_child() -> None:
    # The loop's thread stayed in the parent; the child starts its own on first use.
    global _lock, _portal, _pid
    _lock = threading.Lock()
    _portal = None
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)
