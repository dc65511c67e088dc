"""A blocking client call that holds the GIL, like BAML's sync client before 0.77.

``ctypes.PyDLL`` keeps the GIL during the C call, so while it runs no other thread of the
process can execute Python: in a Flask worker, every other request freezes. Module level,
so a worker process can import it by name.
"""

from __future__ import annotations

import ctypes

_libc = ctypes.PyDLL(None)


def count_tokens(text: str, delay: float) -> int:
    """Count whitespace-separated tokens after ``delay`` seconds spent holding the GIL."""
    _libc.usleep(int(delay * 1_000_000))
    return len(text.split())
