"""The runtime's one fork hook: process-wide state starts over in a forked child.

A forked child (``gunicorn --preload`` workers, ``os.fork()``) inherits the parent's
memory but none of its threads: a background loop, a thread pool or a process pool
made in the parent is, in the child, a handle on threads and processes that aren't
there. Every runtime module that keeps such state registers a reset here, and this
module alone calls :func:`os.register_at_fork`, so the order of resets is the order
of registration and nothing is reset twice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

__all__ = ["on_fork_in_child"]

_resets: list[Callable[[], None]] = []
_lock = threading.Lock()


def on_fork_in_child(reset: Callable[[], None]) -> Callable[[], None]:
    """Register ``reset`` to run in every forked child, right after the fork.

    Usable as a decorator; returns ``reset``. ``reset`` runs on the forking thread of
    the child with no other thread alive: it must only forget state (drop references,
    make new locks), never wait for or join anything from the parent. Thread-safe.
    """
    with _lock:
        _resets.append(reset)
    return reset


def _after_fork_in_child() -> None:
    global _lock
    # The parent may have held the lock while forking: it is dead weight here.
    _lock = threading.Lock()
    for reset in tuple(_resets):
        reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
