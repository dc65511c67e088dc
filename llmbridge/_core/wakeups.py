"""Async wake-ups batched per event loop, sent once per engine step."""

from __future__ import annotations

import asyncio

__all__ = ["Wakeups", "resolve"]


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
