"""The job contract between an engine and its backend: :class:`Job`, :class:`JobQueue`,
:class:`Backend`.

A :class:`JobQueue` is the engine thread's inbox. It owns everything every driver would
otherwise re-implement: admission (a job leaves the queue once, when it starts or is
dropped), cancellation (a job cancelled before it started is dropped by the queue itself),
expiry at the close deadline, and the counters (every job the engine took ends in exactly
one of completed, failed, cancelled). A backend's ``serve(jobs)`` loop is left with what
differs between backends: how to run a job and how to stop one that is running.

Nothing here knows the :class:`~llmbridge.Engine`: the queue reports a job leaving the
queue and a job ending through callbacks, so the engine and the drivers import this module
and never each other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .._exceptions import BackendError, Cancelled, LLMBridgeError, SlowConsumer
from .._sansio.counters import Counters
from .channel import Channel, Request, Wakeups
from .observe import Observer

__all__ = ["Backend", "EngineStats", "Job", "JobQueue", "JobSink", "wrap_error"]

logger = logging.getLogger("llmbridge")

_COMPLETED, _FAILED, _CANCELLED = "completed", "failed", "cancelled"


def wrap_error(exc: BaseException, what: str, request_id: str | None = None) -> LLMBridgeError:
    """``exc`` as the :class:`~llmbridge.LLMBridgeError` that fails a request.

    A backend's own exception becomes a :class:`~llmbridge.BackendError` and is logged
    here, once, with the request id (``None``: a batch or a whole step, logged by the
    caller): its text goes to the log, while an HTTP client only ever sees
    ``public_message``. Our own errors pass through unlogged.
    """
    if isinstance(exc, LLMBridgeError):
        return exc
    if request_id is not None:
        logger.error("request %s: %s", request_id, what, exc_info=exc)
    error = BackendError(f"{what}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class EngineStats(Counters):
    """Counters kept by the engine; read them from anywhere (values may lag).

    Every request the engine took ends in exactly one of ``completed``, ``failed`` or
    ``cancelled``: once the engine is idle, ``submitted == completed + failed +
    cancelled``. ``rejected`` counts submits refused at once (:class:`Overloaded`), which
    were never submitted.
    """

    __slots__ = ("cancelled", "completed", "failed", "rejected", "steps", "submitted")
    cancelled: int
    completed: int
    failed: int
    rejected: int
    steps: int
    submitted: int


class JobSink(Protocol):
    """Who ends a job's request instead of the job itself (a policy pipeline that may
    retry it). Called once per job, from the thread that ended it; must not block."""

    def job_finished(
        self,
        job: Job,
        finish_reason: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None: ...

    def job_failed(self, job: Job, error: BaseException) -> None: ...


class Job:
    """One admitted request as the backend sees it: the write end of its channel.

    ``emit`` / ``finish`` / ``fail`` may be called from the engine thread or from one
    worker thread the backend hands the job to. ``handle`` belongs to the backend (the
    step generator's own job object, a task, ...); the engine never reads it.
    ``started`` and ``dropped`` are the queue's: a job leaves the admission queue once,
    either when it starts or when it is dropped without running.
    """

    __slots__ = (
        "_emitted",
        "_ended",
        "_plain",
        "_queue",
        "channel",
        "cost",
        "dropped",
        "handle",
        "rank",
        "request",
        "sink",
        "started",
    )

    def __init__(
        self, queue: JobQueue, request: Request, channel: Channel, sink: JobSink | None = None
    ) -> None:
        self._queue = queue
        self.request = request
        self.channel = channel
        self.sink = sink
        self.handle: Any = None
        self.started = False
        self.dropped = False
        #: Tokens this job holds in the engine's ``max_queued_tokens`` while it waits.
        self.cost = 0
        #: Its place among waiting jobs (lower goes first): the submit time, moved
        #: earlier by its priority (see :class:`WaitingJobs`).
        self.rank = request.submitted_at
        self._ended = False
        self._emitted = 0
        # No sink and no output cap: once the job ends its channel has ended too, so
        # emit() needs no checks of its own.
        self._plain = sink is None and queue.max_output is None

    def __repr__(self) -> str:
        return f"<Job {self.request.id!r} {'ended' if self.ended else 'live'}>"

    @property
    def id(self) -> str:
        """The request's id: unique among the engine's live requests."""
        return self.request.id

    @property
    def ended(self) -> bool:
        """True once the job finished, failed, or its consumer went away: stop working on it."""
        return self._ended or self.channel.ended

    @property
    def full(self) -> bool:
        """True while the consumer has ``max_unread`` characters or more left to read."""
        return self.channel.full

    def start(self) -> None:
        """Mark the job as taken by the backend: it leaves the admission queue. Idempotent."""
        if self.started or self.dropped:
            return
        self.started = True
        self.channel.start()
        self._queue._on_left_queue(self)

    def emit(self, text: str, tokens: int = 1) -> bool:
        """Send ``text`` to the consumer. Never blocks; returns False once the job ended.

        Past the engine's ``max_output`` characters the text is cut there and the job
        finishes with ``"length"`` (so this returns False).
        """
        if self._plain:  # the hot path: the channel's own state says it all
            return self.channel.emit(text, tokens, self._queue._wakeups_here())
        if self._ended:
            return False  # an attempt that ended must not write into a retried channel
        limit = self._queue.max_output
        if limit is None or not text:
            return self.channel.emit(text, tokens, self._queue._wakeups_here())
        return self._emit_capped(text, tokens, limit)

    def _emit_capped(self, text: str, tokens: int, limit: int) -> bool:
        room = limit - self._emitted
        if len(text) >= room:
            self.channel.emit(text[:room], tokens, self._queue._wakeups_here())
            self._emitted = limit
            self.finish("length")
            return False
        self._emitted += len(text)
        return self.channel.emit(text, tokens, self._queue._wakeups_here())

    def emit_or_wait(self, text: str, tokens: int = 1) -> bool:
        """:meth:`emit`, then block this (worker) thread while the consumer is behind by
        ``max_unread`` characters. Returns False once the job ended. Never call it on the
        engine thread or an event loop: use :meth:`aemit` there."""
        if not self.emit(text, tokens):
            return False
        if self.channel.full:
            self.channel.wait_space()
        return not self.ended

    async def aemit(self, text: str, tokens: int = 1) -> bool:
        """:meth:`emit`, then wait without blocking the loop while the consumer is behind
        by ``max_unread`` characters. Returns False once the job ended."""
        if not self.emit(text, tokens):
            return False
        if self.channel.full:
            self._queue.flush()  # the consumer must be woken before we wait on it
            await self.channel.await_space()
        return not self.ended

    def finish(
        self,
        finish_reason: str = "stop",
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """End the request successfully (a no-op if the job already ended)."""
        if self.sink is not None:
            if self._queue._settle(self, _COMPLETED):
                self.sink.job_finished(self, finish_reason, prompt_tokens, completion_tokens)
            return
        ended = self.channel.finish(
            finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            wakeups=self._queue._wakeups_here(),
        )
        self._queue._settle(self, _COMPLETED if ended else _CANCELLED)

    def fail(self, error: BaseException) -> None:
        """End the request with ``error`` (a no-op if the job already ended)."""
        kind = _CANCELLED if isinstance(error, Cancelled) else _FAILED
        if self.sink is not None:
            if self._queue._settle(self, kind):
                self.sink.job_failed(self, error)
            return
        ended = self.channel.fail(error, self._queue._wakeups_here())
        self._queue._settle(self, kind if ended else _CANCELLED)

    def cancel(self) -> None:
        """Stop this job (not its channel: a pipeline retrying it keeps that). Never
        blocks; the engine thread drops or stops it before the next step."""
        if not self._ended:
            self._queue.cancel(self)

    def fail_slow_consumer(self) -> None:
        """End the request because its consumer fell ``max_unread`` characters behind a
        backend that can't pause (:class:`~llmbridge.SlowConsumer`)."""
        limit = self.channel.max_unread
        self.fail(SlowConsumer(f"the client fell {limit} characters behind the backend"))


class JobQueue:
    """The engine thread's inbox: new jobs and cancellations, in the order they came.

    A backend's :meth:`Backend.serve` loop calls :meth:`take` between steps and
    :meth:`wait` when it has nothing to do. Producers (any thread) only append and
    notify, so :meth:`Engine.submit` never blocks on the engine. The queue drops jobs
    cancelled before they started, counts every ending once, and at the close deadline
    :meth:`expire` ends everything still live.
    """

    def __init__(
        self,
        stats: EngineStats,
        *,
        on_left_queue: Callable[[Job], None],
        on_ended: Callable[[Job], None] | None = None,
        max_output: int | None = None,
    ) -> None:
        self.stats = stats
        self.max_output = max_output
        self._on_left_queue = on_left_queue
        self._on_ended = on_ended
        self._commands: deque[tuple[bool, Job]] = deque()
        self._event = threading.Event()
        self._notifier: Callable[[], None] = self._event.set
        self._closing = False
        self._deadline: float | None = None
        self._wakeups = Wakeups()
        self._flush_hook: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._live: set[Job] = set()
        # The heartbeat: when the oldest command not yet taken arrived (None: none
        # waits). Set before a command is appended and cleared after take() drained
        # them, so a stale time can only under-report a wait, never invent one.
        self._pending_since: float | None = None
        #: The engine thread's ident, set by the engine before ``serve`` runs.
        self.thread_id: int | None = None
        #: The engine's observer (told of each step's batch size), or ``None``.
        self.observer: Observer | None = None

    # -- producers (any thread) -------------------------------------------------------

    def put(self, job: Job) -> None:
        """Queue a new job (the engine does, under its admission lock). Never blocks."""
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._commands.append((True, job))

    def cancel(self, job: Job) -> None:
        """Ask the engine thread to stop ``job``. Never blocks; safe from any thread."""
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._commands.append((False, job))
        self._notifier()

    def ping(self) -> None:
        """Ask the engine thread to come by :meth:`take`, as a command would. Never
        blocks; any thread. A health check pings, then reads :attr:`stalled_for`."""
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._notifier()

    @property
    def stalled_for(self) -> float:
        """Seconds the oldest command (or :meth:`ping`) has waited for the engine thread
        to :meth:`take` it; 0.0 when none waits. A live engine thread takes commands
        between two steps, so this grows past one step only when a step is stuck."""
        since = self._pending_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    def notify(self) -> None:
        """Wake the engine thread (a paused job's consumer made room)."""
        self._notifier()

    def close(self, deadline: float) -> None:
        """Stop admitting: the backend finishes its work by ``deadline`` (monotonic)."""
        self._deadline = deadline
        self._closing = True
        self._notifier()

    def _wakeups_here(self) -> Wakeups | None:
        if threading.get_ident() != self.thread_id:
            return None  # a worker thread: wake consumers at once
        if self._flush_hook is not None:
            self._flush_hook()
        return self._wakeups

    def _settle(self, job: Job, kind: str) -> bool:
        """End ``job`` once and count it; False if it had already ended."""
        with self._lock:
            if job._ended:
                return False
            job._ended = True
            self._live.discard(job)
            stats = self.stats
            if kind == _COMPLETED:
                stats.completed += 1
            elif kind == _FAILED:
                stats.failed += 1
            else:
                stats.cancelled += 1
        if self._on_ended is not None:
            self._on_ended(job)
        return True

    # -- the engine thread ------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """True once the engine stopped admitting: finish the work in hand, then return."""
        return self._closing

    @property
    def expired(self) -> bool:
        """True once the close deadline passed: :meth:`expire`, then stop everything."""
        return self._deadline is not None and time.monotonic() >= self._deadline

    @property
    def deadline(self) -> float | None:
        """The monotonic time by which a closing engine must be done, else ``None``."""
        return self._deadline

    @property
    def in_flight(self) -> int:
        """Jobs taken from the queue that have not ended yet."""
        return len(self._live)

    def set_notifier(self, notifier: Callable[[], None]) -> None:
        """Replace how producers wake the engine (an async driver sets its loop's)."""
        self._notifier = notifier
        if self._commands or self._closing:
            notifier()

    def set_flush_hook(self, hook: Callable[[], None] | None) -> None:
        """Called on each engine-thread write (an async driver schedules :meth:`flush`)."""
        self._flush_hook = hook

    def take(self) -> tuple[list[Job], list[Job]]:
        """New jobs to run, and started jobs whose backend work must stop now.

        A job cancelled before it started never needs the backend: the queue drops it
        (it leaves the admission count and is counted cancelled), so a driver holding it
        in a waiting list sees ``job.ended`` and skips it.
        """
        self._event.clear()
        new: list[Job] = []
        stop: list[Job] = []
        commands = self._commands
        while commands:
            is_new, job = commands.popleft()
            if is_new:
                self.stats.submitted += 1
                if job.ended:
                    self.drop(job)
                else:
                    with self._lock:
                        self._live.add(job)
                    new.append(job)
            elif job.started and not job.dropped:
                if not job._ended:
                    job.fail(Cancelled("the request was cancelled"))
                    stop.append(job)
            else:
                self.drop(job)
        self._pending_since = None
        return new, stop

    def drop(self, job: Job, error: BaseException | None = None) -> None:
        """End a job that never started (it leaves the queue) with ``error``, by default
        :class:`~llmbridge.Cancelled`. Idempotent; a no-op for a started job."""
        if job.dropped or job.started:
            return
        job.dropped = True
        self._on_left_queue(job)
        job.fail(error if error is not None else Cancelled("cancelled before it started"))

    def expire(self, error: BaseException) -> None:
        """End every live job with ``error``: the ones that started fail, the ones still
        waiting for a slot are dropped. The driver then stops its own work on them."""
        with self._lock:
            live = list(self._live)
        for job in live:
            if job.started:
                job.fail(error)
            else:
                self.drop(job, error)

    def wait(self, timeout: float | None = None) -> None:
        """Block the engine thread until a command arrives, closing starts or ``timeout``."""
        if self._commands or (self._closing and self._deadline is None):
            return
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            timeout = remaining if timeout is None else min(timeout, remaining)
            if timeout <= 0:
                return
        self._event.wait(timeout)

    def step(self, batch_size: int = 0) -> None:
        """Count one backend step of ``batch_size`` jobs and wake the consumers it fed
        (once per loop)."""
        self.stats.steps += 1
        if batch_size and self.observer is not None:
            self.observe_batch(batch_size)
        self._wakeups.flush()

    def observe_batch(self, batch_size: int) -> None:
        """Tell the engine's observer that one step or batch served ``batch_size`` jobs
        (a driver without :meth:`step` calls it per dispatched batch). Never raises."""
        observer = self.observer
        if observer is not None:
            try:
                observer.step(batch_size)
            except Exception:
                logger.exception("observer %r failed", observer)

    def flush(self) -> None:
        """Wake the consumers fed since the last flush (once per loop)."""
        self._wakeups.flush()


@runtime_checkable
class Backend(Protocol):
    """What an :class:`~llmbridge.Engine` drives on its thread.

    ``serve(jobs)`` runs on the engine thread for the engine's whole life: it takes new
    jobs and the started jobs to stop from ``jobs.take()`` (a :class:`JobQueue`), runs
    them, writes their output with :meth:`Job.emit` / :meth:`Job.finish` /
    :meth:`Job.fail`, skips jobs that ended while they waited, and returns once
    ``jobs.closing`` is set and no work is left. Once ``jobs.expired``, it calls
    ``jobs.expire(error)`` and stops its work on every job. The built-in backends are
    :class:`llmbridge.backends.StepBackend` (ExLlamaV2-style step generators),
    :class:`llmbridge.backends.CallableBackend` (plain functions, coroutines and
    generators, sync or async) and :class:`llmbridge.backends.BatchBackend`.
    """

    def serve(self, jobs: JobQueue) -> None: ...
