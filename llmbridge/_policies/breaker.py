"""A circuit breaker per backend: closed, open, half-open.

Closed, every call goes through and its outcome enters a window of the last ``window``
outcomes. Once the window holds at least ``min_calls`` outcomes and the share of failures
reaches ``failure_ratio`` (or the share of slow calls reaches ``slow_call_ratio``), the
breaker opens: calls fail fast with :class:`~llmbridge.CircuitOpen` (503, with
``Retry-After``) without reaching the backend. After ``open_for`` seconds it lets
``half_open_probes`` calls through; if they all succeed it closes, if one fails it opens
again for another ``open_for``.

The state machine does no I/O and keeps time with an injectable ``clock``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .._exceptions import CircuitOpen

__all__ = ["CircuitBreaker", "Ticket"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass(frozen=True, slots=True)
class Ticket:
    """Issued by :meth:`CircuitBreaker.admit`; hand it back to :meth:`CircuitBreaker.record`."""

    generation: int
    probe: bool


def _ratio(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class CircuitBreaker:
    """Opens on an error ratio or slow-call ratio over a window; half-open probes close it.

    A call is *slow* when its time to first token exceeds ``slow_call_duration``
    seconds. Thread-safe; never blocks. Raises ``ValueError`` on bad configuration.

    >>> breaker = CircuitBreaker(failure_ratio=0.5, window=10, min_calls=4, open_for=30)
    >>> ticket = breaker.admit()
    >>> breaker.record(ticket, failed=False)
    >>> breaker.state
    'closed'
    """

    def __init__(
        self,
        *,
        failure_ratio: float = 0.5,
        slow_call_ratio: float | None = None,
        slow_call_duration: float | None = None,
        window: int = 20,
        min_calls: int = 10,
        open_for: float = 30.0,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_ratio = _ratio("failure_ratio", failure_ratio)
        self.slow_call_ratio = _ratio("slow_call_ratio", slow_call_ratio)
        if (slow_call_ratio is None) != (slow_call_duration is None):
            raise ValueError("slow_call_ratio and slow_call_duration go together")
        if slow_call_duration is not None and not slow_call_duration > 0:
            raise ValueError(f"slow_call_duration must be > 0, got {slow_call_duration!r}")
        self.slow_call_duration = slow_call_duration
        self.window = _count("window", window)
        self.min_calls = _count("min_calls", min_calls)
        if min_calls > window:
            raise ValueError(f"min_calls ({min_calls}) cannot exceed window ({window})")
        if isinstance(open_for, bool) or not isinstance(open_for, int | float) or open_for <= 0:
            raise ValueError(f"open_for must be a positive number of seconds, got {open_for!r}")
        self.open_for = float(open_for)
        self.half_open_probes = _count("half_open_probes", half_open_probes)
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._generation = 0
        self._outcomes: deque[tuple[bool, bool]] = deque(maxlen=window)
        self._opened_at = -math.inf
        self._probes_out = 0
        self._probes_ok = 0
        #: Calls refused while open (for stats and tests).
        self.rejected = 0

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state}>"

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` (open turns half-open lazily)."""
        with self._lock:
            self._advance_locked()
            return self._state

    def _advance_locked(self) -> None:
        if self._state == OPEN and self._clock() >= self._opened_at + self.open_for:
            self._state = HALF_OPEN
            self._generation += 1
            self._probes_out = 0
            self._probes_ok = 0

    def _open_locked(self) -> None:
        self._state = OPEN
        self._generation += 1
        self._opened_at = self._clock()
        self._outcomes.clear()

    def admit(self) -> Ticket:
        """Let a call through and return its ticket, or raise :class:`CircuitOpen`.

        ``CircuitOpen.retry_after`` is the time left until the next half-open probe.
        """
        with self._lock:
            self._advance_locked()
            if self._state == CLOSED:
                return Ticket(self._generation, probe=False)
            if self._state == HALF_OPEN and self._probes_out < self.half_open_probes:
                self._probes_out += 1
                return Ticket(self._generation, probe=True)
            self.rejected += 1
            if self._state == OPEN:
                left = max(0.0, self._opened_at + self.open_for - self._clock())
                message = f"the backend is failing: circuit open for {left:.1f} s more"
            else:
                left = min(self.open_for, 1.0)
                message = "the backend is failing: a half-open probe is in flight"
        raise CircuitOpen(message, retry_after=max(1.0, math.ceil(left)))

    def record(self, ticket: Ticket, *, failed: bool, duration: float | None = None) -> None:
        """Report a call's outcome. ``duration`` is its time to first token (seconds)."""
        slow = (
            self.slow_call_duration is not None
            and duration is not None
            and duration > self.slow_call_duration
        )
        with self._lock:
            if ticket.generation != self._generation:
                return  # admitted before the state changed: its outcome is stale
            if ticket.probe:
                self._probes_out -= 1
                if failed or slow:
                    self._open_locked()
                    return
                self._probes_ok += 1
                if self._probes_ok >= self.half_open_probes:
                    self._state = CLOSED
                    self._generation += 1
                    self._outcomes.clear()
                return
            self._outcomes.append((failed, slow))
            n = len(self._outcomes)
            if n < self.min_calls:
                return
            failures = sum(1 for f, _ in self._outcomes if f)
            slows = sum(1 for _, s in self._outcomes if s)
            assert self.failure_ratio is not None
            if failures / n >= self.failure_ratio or (
                self.slow_call_ratio is not None and slows / n >= self.slow_call_ratio
            ):
                self._open_locked()

    def release(self, ticket: Ticket) -> None:
        """Give back a ticket whose call says nothing about the backend (cancelled by its
        consumer, refused as a bad request)."""
        with self._lock:
            if ticket.probe and ticket.generation == self._generation:
                self._probes_out -= 1
