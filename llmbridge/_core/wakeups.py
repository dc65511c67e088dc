"""Async wake-ups batched per event loop, sent once per engine step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Wakeups", "loop_waker", "resolve"]


def resolve(futures: list[asyncio.Future[None]]) -> None:
    """Resolve every future not done yet (called on their loop)."""
    for future in futures:
        if not future.done():
            future.set_result(None)


class Wakeups:
    """Async wake-ups gathered during one engine step, sent once per event loop.

    Not thread-safe: each producer thread keeps its own.
    """

    __slots__ = ("_by_loop",)

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        futures = self._by_loop.get(loop)
        if futures is None:
            self._by_loop[loop] = [future]
        else:
            futures.append(future)

    def flush(self) -> None:
        """Wake every gathered consumer: one ``call_soon_threadsafe`` per loop."""
        if not self._by_loop:
            return
        by_loop, self._by_loop = self._by_loop, {}
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(resolve, futures)
            except RuntimeError:
                pass  # the consumer's loop is closed: nobody is left to wake


def loop_waker(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> Callable[[], None]:
    """A notifier for :meth:`JobQueue.set_notifier` that sets ``event`` on ``loop``.

    Callable from any thread; calls made before the loop ran the last one coalesce into
    one ``call_soon_threadsafe``. Once the loop is closed it does nothing (the engine is
    stopping).
    """
    scheduled = False

    def on_loop() -> None:
        nonlocal scheduled
        scheduled = False
        event.set()

    def notify() -> None:
        nonlocal scheduled
        if not scheduled:
            scheduled = True
            try:
                loop.call_soon_threadsafe(on_loop)
            except RuntimeError:
                pass  # the loop is gone: the engine is stopping

    return notify
