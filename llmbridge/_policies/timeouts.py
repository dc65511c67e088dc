"""Deadlines for one request: queue wait, time to first token, total.

:class:`Timeouts` is configuration; :class:`Deadlines` turns it into monotonic instants
for one request and answers "how long may I wait now, and which deadline passed?". No
I/O: the pipeline waits, this only does the arithmetic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .._exceptions import Timeout

__all__ = ["Deadlines", "Timeouts"]


def _seconds(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-request deadlines in seconds (``None``: no limit). Each one passing cancels the
    backend job and fails the request with :class:`~llmbridge.Timeout` (504).

    - ``queue``: longest one attempt may wait for a backend slot;
    - ``first_token``: from submission to the first text, retries included;
    - ``total``: from submission to the end, retries included.
    """

    queue: float | None = None
    first_token: float | None = None
    total: float | None = None

    def __post_init__(self) -> None:
        _seconds("queue", self.queue)
        _seconds("first_token", self.first_token)
        _seconds("total", self.total)

    @property
    def any(self) -> bool:
        """True if at least one deadline is set."""
        return not (self.queue is None and self.first_token is None and self.total is None)


class Deadlines:
    """The monotonic deadlines of one request, from its submission time ``start``."""

    __slots__ = ("first_token", "queue", "timeouts", "total")

    def __init__(self, timeouts: Timeouts, start: float) -> None:
        self.timeouts = timeouts
        self.first_token = (
            math.inf if timeouts.first_token is None else start + timeouts.first_token
        )
        self.total = math.inf if timeouts.total is None else start + timeouts.total
        self.queue = math.inf

    def attempt_started(self, now: float) -> None:
        """A new attempt entered the backend queue at ``now``: restart the queue clock."""
        self.queue = math.inf if self.timeouts.queue is None else now + self.timeouts.queue

    @property
    def end(self) -> float | None:
        """The last instant the request may run to (``None``: unbounded)."""
        return None if self.total == math.inf else self.total

    def wait_for(self, *, started: bool, has_text: bool, now: float | None = None) -> float | None:
        """Seconds until the next deadline that still applies (``None``: no deadline)."""
        now = time.monotonic() if now is None else now
        nearest = self.total
        if not has_text:
            nearest = min(nearest, self.first_token)
        if not started:
            nearest = min(nearest, self.queue)
        return None if nearest == math.inf else max(0.0, nearest - now)

    def passed(self, *, started: bool, has_text: bool, now: float | None = None) -> Timeout | None:
        """The :class:`~llmbridge.Timeout` for a deadline that passed, else ``None``."""
        now = time.monotonic() if now is None else now
        t = self.timeouts
        if now >= self.total:
            return Timeout(f"the request took longer than its total timeout of {t.total} s")
        if not has_text and now >= self.first_token:
            return Timeout(f"no first token within {t.first_token} s")
        if not started and now >= self.queue:
            return Timeout(f"waited longer than {t.queue} s for a backend slot")
        return None
