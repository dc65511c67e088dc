"""Detecting a second thread inside an object that only one thread may drive."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .._exceptions import ConcurrentEntryError

__all__ = ["EntryGuard"]


class EntryGuard:
    """Raises :class:`~llmbridge.ConcurrentEntryError` instead of letting two threads in.

    Not a lock: a second thread is refused, never made to wait, so a broken single-owner
    invariant shows up as an error (counted in ``concurrent_entries``) instead of as
    silently interleaved state. ``threads`` records every thread that entered.
    """

    def __init__(self) -> None:
        self._inside = threading.Lock()
        self.concurrent_entries = 0
        self.threads: set[int] = set()

    @contextmanager
    def enter(self, what: str) -> Iterator[None]:
        """``with guard.enter("iterate"):`` around each method of the guarded object."""
        self.threads.add(threading.get_ident())
        if not self._inside.acquire(blocking=False):
            self.concurrent_entries += 1
            raise ConcurrentEntryError(f"{what}() entered while another thread was inside")
        try:
            yield
        finally:
            self._inside.release()

    def after_fork(self) -> None:
        """In a forked child: a thread that was inside at fork time stayed in the parent."""
        self._inside = threading.Lock()
