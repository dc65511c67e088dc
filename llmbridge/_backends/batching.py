"""Dynamic batching for batch backends: ``fn(list[Request]) -> list[result]``.

Requests wait in per-priority queues on the engine thread. A batch is dispatched as soon
as a batch slot is free and either ``max_batch_size`` requests wait or the oldest has
waited ``max_queue_delay`` seconds. With the default delay of 0 a lone request never
waits for company (as Triton's default): batches form from the requests that arrive
while the previous batch runs, which is where batching pays off under load.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .._core.channel import Request
from .._core.jobs import Job, JobQueue, wrap_error
from .._core.pieces import Ending, read_piece
from .._core.wakeups import loop_waker
from .._exceptions import BackendError, BadRequest, EngineClosed, LLMBridgeError, Timeout

__all__ = ["BatchBackend"]

logger = logging.getLogger("llmbridge")


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _seconds(name: str, value: float | None, *, zero_ok: bool) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero_ok)
    ):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a number of seconds {bound}, got {value!r}")
    return float(value)


class BatchBackend:
    """Runs ``fn(requests) -> results`` on batches of requests: a dynamic batcher.

    ``fn`` may be sync (run in a worker thread, never on the engine's loop) or a
    coroutine function. It receives a list of :class:`~llmbridge.Request` and returns a
    list of the same length, in the same order; each item is the ``str`` answer of that
    request, an object that also says how it ended (``finish_reason``, usage: as a
    :class:`~llmbridge.backends.CallableBackend` chunk, so ``"length"`` reaches the
    client when ``max_tokens`` cut it), or an exception instance that fails only that
    request. An exception from
    ``fn`` itself, or a list of the wrong length, fails the whole batch.

    - ``max_batch_size``: at most this many requests per call;
    - ``max_queue_delay``: seconds the oldest waiting request may wait for the batch to
      fill (default 0: dispatch at once when a batch slot is free);
    - ``priority_levels``: a request's ``priority`` parameter (an int from 0, the
      default, to ``priority_levels - 1``) picks its queue; higher numbers go first,
      and priority ages as in every driver (the engine's ``priority_aging`` seconds per
      level: :class:`~llmbridge._core.admission.WaitingJobs`), so a low-priority request
      still goes before high-priority ones submitted long enough after it;
    - ``queue_timeout``: seconds a request may wait before it fails with
      :class:`~llmbridge.Timeout` (504); a request's ``queue_timeout`` parameter
      overrides it;
    - ``max_concurrent_batches``: batch calls in flight at once (1: a single model).

    ``priority`` and ``queue_timeout`` stay in ``request.params`` for ``fn`` to ignore.
    A request cancelled while queued never reaches ``fn``; one cancelled inside a
    running batch has its answer dropped. Raises ``ValueError`` on bad configuration.

    >>> def generate(requests):
    ...     return [r.prompt.upper() for r in requests]
    >>> backend = BatchBackend(generate, max_batch_size=32, max_queue_delay=0.002)
    """

    def __init__(
        self,
        fn: Callable[[list[Request]], Any],
        *,
        max_batch_size: int = 32,
        max_queue_delay: float = 0.0,
        priority_levels: int = 2,
        queue_timeout: float | None = None,
        max_concurrent_batches: int = 1,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"BatchBackend needs a callable fn(requests), got {fn!r}")
        self.fn = fn
        self.max_batch_size = _positive_int("max_batch_size", max_batch_size)
        delay = _seconds("max_queue_delay", max_queue_delay, zero_ok=True)
        assert delay is not None
        self.max_queue_delay = delay
        self.priority_levels = _positive_int("priority_levels", priority_levels)
        if priority_levels < 2:
            raise ValueError(f"priority_levels must be >= 2, got {priority_levels!r}")
        self.queue_timeout = _seconds("queue_timeout", queue_timeout, zero_ok=False)
        self.max_concurrent_batches = _positive_int(
            "max_concurrent_batches", max_concurrent_batches
        )
        self._is_async = inspect.iscoroutinefunction(fn)
        #: Sizes of the batches dispatched so far (for tests and benchmarks).
        self.batch_sizes: list[int] = []

    def __repr__(self) -> str:
        return (
            f"BatchBackend({getattr(self.fn, '__qualname__', self.fn)!r}, "
            f"max_batch_size={self.max_batch_size}, max_queue_delay={self.max_queue_delay})"
        )

    def serve(self, jobs: JobQueue) -> None:
        """Run the batcher on a fresh event loop on the engine thread until it closes."""
        asyncio.run(_Batcher(self, jobs).main())


class _Waiting:
    __slots__ = ("deadline", "job")

    def __init__(self, job: Job, deadline: float) -> None:
        self.job = job
        self.deadline = deadline


class _Batcher:
    def __init__(self, backend: BatchBackend, jobs: JobQueue) -> None:
        self.backend = backend
        self.jobs = jobs
        self.queues: list[deque[_Waiting]] = [deque() for _ in range(backend.priority_levels)]
        self.running: set[asyncio.Task[None]] = set()
        self.running_jobs: dict[asyncio.Task[None], list[Job]] = {}
        self.wake = asyncio.Event()

    def _queued(self) -> int:
        return sum(len(q) for q in self.queues)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        jobs = self.jobs
        jobs.set_notifier(loop_waker(loop, self.wake))
        import anyio

        self.limiter = anyio.CapacityLimiter(self.backend.max_concurrent_batches)
        try:
            while True:
                # Jobs cancelled in a running batch just have their answer dropped.
                new, _stop = jobs.take()
                for job in new:
                    self._enqueue(job)
                if jobs.expired:
                    jobs.expire(EngineClosed("the engine closed before the request finished"))
                    for task in self.running:
                        task.cancel()
                    for queue in self.queues:
                        queue.clear()
                now = time.monotonic()
                self._drop_expired(now)
                next_wake = self._dispatch(now, loop)
                jobs.flush()  # wake the consumers of jobs dropped above, once per loop
                if jobs.closing and not self.running and not self._queued():
                    break
                if jobs.deadline is not None and not jobs.expired:
                    next_wake = min(next_wake, jobs.deadline + 0.001)
                timeout = None if next_wake == math.inf else max(0.0, next_wake - now)
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout)
                except TimeoutError:
                    pass
                self.wake.clear()
        finally:
            jobs.flush()

    def _enqueue(self, job: Job) -> None:
        params = job.request.params
        priority = params.get("priority", 0)
        levels = self.backend.priority_levels
        if (
            isinstance(priority, bool)
            or not isinstance(priority, int)
            or not 0 <= priority < levels
        ):
            self.jobs.drop(
                job, BadRequest(f"priority must be an int from 0 to {levels - 1}, got {priority!r}")
            )
            return
        timeout = params.get("queue_timeout", self.backend.queue_timeout)
        try:
            timeout = _seconds("queue_timeout", timeout, zero_ok=False)
        except ValueError as exc:
            self.jobs.drop(job, BadRequest(str(exc)))
            return
        deadline = math.inf if timeout is None else job.request.submitted_at + timeout
        self.queues[priority].append(_Waiting(job, deadline))

    def _drop_expired(self, now: float) -> None:
        for queue in self.queues:
            if not queue:
                continue
            kept: deque[_Waiting] = deque()
            for waiting in queue:
                job = waiting.job
                if job.ended:
                    self.jobs.drop(job)  # idempotent: its consumer left while it waited
                    continue
                if now >= waiting.deadline:
                    waited = now - job.request.submitted_at
                    self.jobs.drop(
                        job, Timeout(f"waited {waited:.3f} s in the batch queue: queue timeout")
                    )
                else:
                    kept.append(waiting)
            queue.clear()
            queue.extend(kept)

    def _next_deadline(self) -> float:
        return min(
            (w.deadline for q in self.queues for w in q),
            default=math.inf,
        )

    def _dispatch(self, now: float, loop: asyncio.AbstractEventLoop) -> float:
        """Start every batch that may start now; return when to look again."""
        backend = self.backend
        while len(self.running) < backend.max_concurrent_batches:
            queued = self._queued()
            if not queued:
                return self._next_deadline()
            oldest = min(q[0].job.request.submitted_at for q in self.queues if q)
            ready_at = oldest + backend.max_queue_delay
            if queued < backend.max_batch_size and now < ready_at and not self.jobs.closing:
                return min(ready_at, self._next_deadline())
            batch: list[Job] = []
            while len(batch) < backend.max_batch_size:
                # Each queue is in rank order (FIFO within a priority), so the head with
                # the lowest rank is the next job by aged priority.
                heads = [queue for queue in self.queues if queue]
                if not heads:
                    break
                job = min(heads, key=lambda queue: queue[0].job.rank).popleft().job
                if job.ended:
                    self.jobs.drop(job)  # idempotent: its consumer left while it waited
                else:
                    batch.append(job)
            if not batch:
                continue
            for job in batch:
                job.start()
            backend.batch_sizes.append(len(batch))
            self.jobs.observe_batch(len(batch))
            task = loop.create_task(self._run(batch))
            self.running.add(task)
            self.running_jobs[task] = batch
            task.add_done_callback(self._done)
        return self._next_deadline()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        self.running_jobs.pop(task, None)
        self.wake.set()

    async def _run(self, batch: list[Job]) -> None:
        backend = self.backend
        requests = [job.request for job in batch]
        try:
            if backend._is_async:
                async with self.limiter:
                    results = await backend.fn(requests)
            else:
                import anyio.to_thread

                results = await anyio.to_thread.run_sync(backend.fn, requests, limiter=self.limiter)
            if not isinstance(results, list | tuple) or len(results) != len(batch):
                got = len(results) if isinstance(results, list | tuple) else type(results).__name__
                raise BackendError(
                    f"the batch function returned {got} results for {len(batch)} requests"
                )
        except asyncio.CancelledError:
            closed = EngineClosed("the engine closed before the batch finished")
            for job in batch:
                job.fail(closed)
            raise
        except Exception as exc:
            if not isinstance(exc, LLMBridgeError):
                ids = ", ".join(job.id for job in batch)
                logger.error("requests %s: the batch function failed", ids, exc_info=exc)
            error = wrap_error(exc, "the batch function failed")
            for job in batch:
                job.fail(error)
            self.jobs.flush()
            return
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                job.fail(wrap_error(result, "the batch function failed this request", job.id))
            elif isinstance(result, str):
                job.emit(result)
                job.finish("stop")
            else:
                ending = Ending()
                try:
                    text = read_piece(result, ending)
                except TypeError:
                    kind = type(result).__name__
                    job.fail(BackendError(f"batch results must be str or an exception, got {kind}"))
                    continue
                job.emit(text)
                job.finish(
                    ending.finish_reason or "stop",
                    prompt_tokens=ending.prompt_tokens,
                    completion_tokens=ending.completion_tokens,
                )
        self.jobs.flush()
