"""Admission helpers of the engine: token counts, priorities, the drain rate behind a
refusal's ``Retry-After``, and :class:`WaitingJobs`, the priority order every driver
starts its waiting jobs in. No threads of its own; the engine calls these under its lock.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .._exceptions import BadRequest

if TYPE_CHECKING:
    from .jobs import Job

__all__ = ["DrainRate", "WaitingJobs", "estimate_tokens", "request_priority", "token_cost"]

#: How far back the drain rate behind a refusal's ``Retry-After`` looks (seconds), and
#: how many departures from the queue it remembers.
_RATE_WINDOW = 30.0
_RATE_SAMPLES = 256
#: Bounds of a computed ``Retry-After`` (seconds): under one second a client would only
#: hammer a full queue, past five minutes the estimate means nothing any more.
_MIN_RETRY_AFTER, _MAX_RETRY_AFTER = 1.0, 300.0


def estimate_tokens(prompt: str) -> int:
    """The default prompt token estimate: one token per four characters, rounded up.

    Close enough for English text with the common BPE tokenizers, and free: admission
    runs on the caller's thread for every request, where a real tokenizer would cost
    more than the bookkeeping it feeds. Pass ``Engine(token_estimate=...)`` to count with
    the model's own tokenizer. Pure.
    """
    return (len(prompt) + 3) // 4


def token_cost(
    prompt: str, params: dict[str, Any], estimate: Callable[[str], int], limit: int | None
) -> int:
    """Tokens a request holds while it waits: its prompt's estimate plus the new tokens it
    asks for (``max_new_tokens``, else ``max_tokens``). 0 when there is no ``limit`` to
    count against (the estimate is then never called). Call it outside any lock: the
    estimate is the caller's code."""
    if limit is None:
        return 0
    cost = int(estimate(prompt))
    wanted = params.get("max_new_tokens", params.get("max_tokens"))
    if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > 0:
        cost += wanted
    return max(0, cost)


def request_priority(params: dict[str, Any]) -> int:
    """A request's ``priority`` parameter (default 0). Raises :class:`BadRequest` unless
    it is an int."""
    priority = params.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise BadRequest(f"priority must be an int, got {priority!r}")
    return priority


class DrainRate:
    """How fast the queue drained lately, as the ``Retry-After`` of a refusal.

    The engine :meth:`record` s each job leaving the queue for a backend slot; a refusal
    asks :meth:`retry_after` how long ``excess`` requests (or tokens) take to leave at
    the rate of the last 30 s. ``clock`` is injectable for tests. Not thread-safe: the
    engine calls it under its lock.
    """

    __slots__ = ("_clock", "_samples")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # (time, tokens) of the last jobs that left the queue.
        self._samples: deque[tuple[float, int]] = deque(maxlen=_RATE_SAMPLES)

    def record(self, cost: int) -> None:
        """A job holding ``cost`` tokens left the queue now."""
        self._samples.append((self._clock(), cost))

    def retry_after(self, excess: int, *, tokens: bool = False) -> float:
        """Seconds until ``excess`` requests (``tokens``: tokens) leave the queue at the
        recent rate; 1 s when nothing left it lately, never over 300 s."""
        now = self._clock()
        samples = self._samples
        while samples and samples[0][0] < now - _RATE_WINDOW:
            samples.popleft()
        if not samples:
            return _MIN_RETRY_AFTER  # nothing left the queue lately: no rate to go by
        elapsed = max(now - samples[0][0], 1e-3)
        drained = sum(cost for _, cost in samples) if tokens else len(samples)
        if drained <= 0:
            return _MIN_RETRY_AFTER
        return min(max(excess * elapsed / drained, _MIN_RETRY_AFTER), _MAX_RETRY_AFTER)


class WaitingJobs:
    """Jobs that wait for a backend slot, highest effective priority first.

    A driver keeps its waiting jobs here instead of in a ``deque`` (the same
    ``extend`` / ``popleft`` / ``clear`` / ``len``), so every backend honours a request's
    ``priority`` parameter the same way. Priority ages: a waiting job's effective
    priority is ``priority + waited / aging`` (``aging``: the engine's
    ``priority_aging`` seconds per level), which orders jobs exactly as the fixed key
    ``submitted_at - priority * aging`` does (:attr:`Job.rank`). So no request starves:
    one with priority ``p`` goes before every request of priority ``q`` submitted more
    than ``(q - p) * aging`` seconds after it. Equal ranks keep their arrival order.
    Engine thread only.
    """

    __slots__ = ("_heap", "_seq")

    def __init__(self, jobs: Iterable[Job] = ()) -> None:
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self.extend(jobs)

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Job]:
        """The waiting jobs in the order they would start (a sorted copy)."""
        return iter([entry[2] for entry in sorted(self._heap)])

    def append(self, job: Job) -> None:
        """Add one job."""
        heapq.heappush(self._heap, (job.rank, next(self._seq), job))

    def extend(self, jobs: Iterable[Job]) -> None:
        """Add jobs (in the order given, for equal ranks)."""
        heap, seq = self._heap, self._seq
        for job in jobs:
            heapq.heappush(heap, (job.rank, next(seq), job))

    def popleft(self) -> Job:
        """Remove and return the job to start next. Raises ``IndexError`` when empty."""
        return heapq.heappop(self._heap)[2]

    def clear(self) -> None:
        """Forget every waiting job."""
        self._heap.clear()
