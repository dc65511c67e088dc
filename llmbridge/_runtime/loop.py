"""The process's background event loop, for async work that must not run on a caller's loop.

Flask async views, policies with async I/O (Redis) and other bridges share one
long-lived asyncio loop per process, on a daemon thread: a :class:`BackgroundLoop`.
:meth:`BackgroundLoop.current` is the one accessor that starts it (lazily, on first
use); :meth:`BackgroundLoop.stop` stops it (tests, or a clean shutdown); a forked child
forgets the parent's and starts its own on first use.

Why not anyio's ``start_blocking_portal``: its context manager must be exited to stop
the loop, and a forked child inherits the parent's un-exited manager, whose clean-up
then waits forever for a loop thread that stayed in the parent. A bare daemon thread
running ``loop.run_forever()`` has nothing to clean up in the child, and
``asyncio.run_coroutine_threadsafe`` is the whole of what we need from a portal.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, ClassVar, TypeVar

from .fork import on_fork_in_child

__all__ = ["BackgroundLoop", "background_loop", "spawn"]

T = TypeVar("T")


class BackgroundLoop:
    """One asyncio event loop running on a daemon thread of its own.

    Lifecycle: created stopped; :meth:`start` starts it (idempotent); :meth:`stop`
    cancels what still runs on it, stops and closes it; a stopped loop may be started
    again (a new asyncio loop, so objects bound to the old one don't carry over).
    The process-wide instance comes from :meth:`current`, which starts it on first use
    and, in a forked child, starts a fresh one.

    Thread-safe: every method may be called from any thread; :meth:`stop` must not be
    called from the loop's own thread (it would wait for itself).
    """

    _current: ClassVar[BackgroundLoop | None] = None
    _current_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, *, name: str = "llmbridge-loop") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<BackgroundLoop {self.name!r} {state}>"

    @classmethod
    def current(cls) -> BackgroundLoop:
        """The process's background loop, started. Never blocks for long (the first
        call waits for the loop thread to come up). Thread-safe; fork-safe."""
        current = cls._current
        if current is not None and current.running:
            return current
        with cls._current_lock:
            if cls._current is None:
                cls._current = cls()
            return cls._current.start()

    @property
    def running(self) -> bool:
        """Whether the loop thread is up and its loop runs."""
        loop, thread = self._loop, self._thread
        return loop is not None and thread is not None and thread.is_alive()

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread while it runs, else ``None``."""
        return self._thread if self.running else None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running asyncio loop (starting it if needed), e.g. for
        ``call_soon_threadsafe``."""
        loop = self._loop
        if loop is None or not self.running:
            loop = self.start()._loop
        assert loop is not None
        return loop

    def start(self) -> BackgroundLoop:
        """Start the loop thread if it isn't running; return ``self``.

        Blocks until the loop runs. Idempotent and thread-safe.
        """
        with self._lock:
            if self.running:
                return self
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=self._run, args=(loop, ready), name=self.name, daemon=True
            )
            thread.start()
            ready.wait()
            self._loop, self._thread = loop, thread
        return self

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Run ``coro`` on the loop; return a :class:`concurrent.futures.Future` for its
        result (cancelling the future cancels the task). Never blocks, from any thread
        or event loop, this one included."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., object], /, *args: Any) -> None:
        """Schedule the plain callable ``fn(*args)`` on the loop. Never blocks."""
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every task still on the loop, wait up to ``timeout`` seconds for them,
        stop the loop and close it. Idempotent.

        Blocks the caller; raises ``RuntimeError`` on the loop's own thread. Objects
        bound to the stopped loop (clients, locks) are unusable afterwards.
        """
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or not thread.is_alive():
            return
        if threading.current_thread() is thread:
            with self._lock:
                self._loop, self._thread = loop, thread
            raise RuntimeError("BackgroundLoop.stop() from its own thread would deadlock")
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout)
        except TimeoutError:
            pass  # what doesn't stop in time is dropped with the loop
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    def _forget(self) -> None:
        # In a forked child: the loop thread stayed in the parent, and the loop object
        # shares the parent's selector; touching it could disturb the parent.
        self._lock = threading.Lock()
        self._loop = self._thread = None


async def _cancel_all() -> None:
    this = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not this]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


@on_fork_in_child
def _reset_in_child() -> None:
    BackgroundLoop._current_lock = threading.Lock()
    current = BackgroundLoop._current
    if current is not None:
        current._forget()


def background_loop() -> asyncio.AbstractEventLoop:
    """The asyncio loop of :meth:`BackgroundLoop.current` (to schedule work on it
    without waiting). Starts it on first use; thread-safe; fork-safe."""
    return BackgroundLoop.current().loop


def spawn(coro: Coroutine[Any, Any, T]) -> Future[T]:
    """Run ``coro`` on the process's background loop; return a
    :class:`concurrent.futures.Future`. Never blocks, from any thread or event loop
    (including the background loop)."""
    return BackgroundLoop.current().spawn(coro)
