"""The process-wide background event loop, for work that must not run on a caller's loop.

Flask async views, policies with async I/O (Redis) and other bridges share one
long-lived asyncio loop per process, run by an anyio :class:`~anyio.from_thread.BlockingPortal`
on a daemon thread. It starts on first use and again, fresh, in a forked child.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

__all__ = ["background_loop", "background_portal", "spawn"]

T = TypeVar("T")

_lock = threading.Lock()
_portal: BlockingPortal | None = None
_context: AbstractContextManager[BlockingPortal] | None = None
_loop: asyncio.AbstractEventLoop | None = None
_pid = os.getpid()


def background_portal() -> BlockingPortal:
    """The process's background portal: ``portal.call(async_fn, *args)`` from any thread
    (not from the background loop itself) runs ``async_fn`` there and blocks for its
    result. Starts the loop on first use; thread-safe; fork-safe."""
    global _portal, _context, _loop, _pid
    portal = _portal
    if portal is not None and _pid == os.getpid():
        return portal
    with _lock:
        if _pid != os.getpid():
            _forget()
        if _portal is None:
            _context = start_blocking_portal("asyncio", name="llmbridge-loop")
            _portal = _context.__enter__()
            _loop = _portal.call(_running_loop)
            _pid = os.getpid()
        return _portal


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def background_loop() -> asyncio.AbstractEventLoop:
    """The background portal's event loop (to schedule work without waiting for it)."""
    background_portal()
    assert _loop is not None
    return _loop


def spawn(coro: Coroutine[Any, Any, T]) -> Future[T]:
    """Run ``coro`` on the background loop and return a :class:`concurrent.futures.Future`.

    Never blocks, from any thread or event loop (including the background loop).
    """
    return asyncio.run_coroutine_threadsafe(coro, background_loop())


def _forget() -> None:
    # After a fork the portal's thread stayed in the parent: start over lazily.
    global _portal, _context, _loop, _pid
    _portal = None
    _context = None
    _loop = None
    _pid = os.getpid()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
