"""The engine: one thread per backend that alone ever touches it.

Callers only :meth:`Engine.submit` a request and receive a :class:`Stream`. Submitting
appends a command to the engine's inbox and never blocks; the engine thread takes the
commands between steps, so a cancellation reaches the backend within one step.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .._exceptions import BadRequest, Cancelled, EngineClosed, Overloaded
from .closing import Closing
from .stream import Channel, Request, Stream, Wakeups

__all__ = ["Backend", "Engine", "EngineStats", "Job", "JobQueue", "Submitter"]

logger = logging.getLogger("llmbridge")

_ids = itertools.count(1)


class Job:
    """One admitted request as the engine thread sees it: the backend's write end.

    ``emit``/``finish``/``fail`` may be called from the engine thread or from one
    worker thread the backend hands the job to; ``handle`` is free for the backend (the
    step generator's own job object, a task, ...).
    """

    __slots__ = ("_queue", "channel", "handle", "request")

    def __init__(self, queue: JobQueue, request: Request, channel: Channel) -> None:
        self._queue = queue
        self.request = request
        self.channel = channel
        self.handle: Any = None

    @property
    def id(self) -> str:
        """The request's id."""
        return self.request.id

    @property
    def ended(self) -> bool:
        """True once the request finished, failed or its consumer cancelled it."""
        return self.channel.ended

    def start(self) -> None:
        """Mark the job as taken by the backend: it leaves the admission queue."""
        self.channel.start()
        self._queue._left_queue()

    def emit(self, text: str, tokens: int = 1) -> bool:
        """Send ``text`` to the consumer. Returns False once the job has ended."""
        return self.channel.emit(text, tokens, self._queue._wakeups_here())

    def finish(
        self,
        finish_reason: str = "stop",
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """End the request successfully."""
        if self.channel.finish(
            finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            wakeups=self._queue._wakeups_here(),
        ):
            self._queue.stats.completed += 1
        self._queue._live.pop(self.request.id, None)

    def fail(self, error: BaseException) -> None:
        """End the request with ``error`` (a no-op if it already ended)."""
        if self.channel.fail(error, self._queue._wakeups_here()):
            if isinstance(error, Cancelled):
                self._queue.stats.cancelled += 1
            else:
                self._queue.stats.failed += 1
        self._queue._live.pop(self.request.id, None)


class EngineStats:
    """Counters kept by the engine thread; read them from anywhere (values may lag)."""

    __slots__ = ("cancelled", "completed", "failed", "steps", "submitted")

    def __init__(self) -> None:
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.steps = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {name: getattr(self, name) for name in self.__slots__}


class JobQueue:
    """The engine thread's inbox: new jobs and cancellations, in the order they came.

    A backend's :meth:`Backend.serve` loop calls :meth:`take` between steps and
    :meth:`wait` when it has nothing to do. Producers (any thread) only append and
    notify, so :meth:`Engine.submit` never blocks on the engine.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._commands: deque[tuple[bool, Job]] = deque()
        self._event = threading.Event()
        self._notifier: Callable[[], None] = self._event.set
        self._closing = False
        self._deadline: float | None = None
        self._wakeups = Wakeups()
        self._flush_hook: Callable[[], None] | None = None
        self._thread_id: int | None = None
        self._live: dict[str, Job] = {}
        self.stats = engine._stats

    # -- producers (any thread) -------------------------------------------------------

    def _cancel(self, job: Job) -> None:
        self._commands.append((False, job))
        self._notifier()

    def _close(self, deadline: float) -> None:
        self._deadline = deadline
        self._closing = True
        self._notifier()

    def _left_queue(self) -> None:
        self._engine._left_queue()

    def _wakeups_here(self) -> Wakeups | None:
        if threading.get_ident() != self._thread_id:
            return None  # a worker thread: wake consumers at once
        if self._flush_hook is not None:
            self._flush_hook()
        return self._wakeups

    # -- the engine thread ------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """True once the engine stopped admitting: finish the work in hand, then return."""
        return self._closing

    @property
    def expired(self) -> bool:
        """True once the close deadline passed: cancel everything still running."""
        return self._deadline is not None and time.monotonic() >= self._deadline

    @property
    def deadline(self) -> float | None:
        """The monotonic time by which a closing engine must be done, else ``None``."""
        return self._deadline

    def set_notifier(self, notifier: Callable[[], None]) -> None:
        """Replace how producers wake the engine (an async driver sets its loop's)."""
        self._notifier = notifier
        if self._commands or self._closing:
            notifier()

    def set_flush_hook(self, hook: Callable[[], None] | None) -> None:
        """Called on each engine-thread write (an async driver schedules :meth:`flush`)."""
        self._flush_hook = hook

    def take(self) -> tuple[list[Job], list[Job]]:
        """New jobs and jobs whose consumers cancelled them, since the last call."""
        self._event.clear()
        new: list[Job] = []
        cancelled: list[Job] = []
        commands = self._commands
        live = self._live
        while commands:
            is_new, job = commands.popleft()
            if is_new:
                new.append(job)
                if not job.ended:
                    live[job.request.id] = job
            else:
                cancelled.append(job)
                if live.pop(job.request.id, None) is not None:
                    self.stats.cancelled += 1
        self.stats.submitted += len(new)
        return new, cancelled

    @property
    def in_flight(self) -> int:
        """Jobs taken from the queue that have not ended yet."""
        return len(self._live)

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

    def step(self) -> None:
        """Count one backend step and wake the consumers it fed (once per loop)."""
        self.stats.steps += 1
        self._wakeups.flush()

    def flush(self) -> None:
        """Wake the consumers fed since the last flush (once per loop)."""
        self._wakeups.flush()

    def drop(self, job: Job, error: BaseException | None = None) -> None:
        """Remove a job that never started: it leaves the queue, failing with ``error``."""
        self._engine._left_queue()
        if error is not None:
            job.fail(error)


@runtime_checkable
class Backend(Protocol):
    """What an :class:`Engine` drives on its thread.

    ``serve(jobs)`` runs on the engine thread for the engine's whole life: it takes new
    jobs and cancellations from ``jobs`` (a :class:`JobQueue`), runs them, writes their
    output with :meth:`Job.emit` / :meth:`Job.finish` / :meth:`Job.fail`, and returns
    once ``jobs.closing`` is set and no work is left. It must cancel everything when
    ``jobs.expired``. The built-in backends are :class:`llmbridge.backends.StepBackend`
    (ExLlamaV2-style step generators) and :class:`llmbridge.backends.CallableBackend`
    (plain functions, coroutines and generators, sync or async).
    """

    def serve(self, jobs: JobQueue) -> None: ...


@runtime_checkable
class Submitter(Protocol):
    """Anything that admits requests like :meth:`Engine.submit`: an engine, or an engine
    wrapped in policies. Integrations accept any submitter."""

    def submit(self, prompt: str, /, *, request_id: str | None = None, **params: Any) -> Stream: ...


_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


class Engine(Closing):
    """Owns one backend on a dedicated thread; the only way requests reach it.

    ``backend`` is a :class:`Backend` (for example a
    :class:`~llmbridge.backends.StepBackend`) or a plain callable ``fn(prompt, **params)``
    that returns ``str``, yields chunks, or is a coroutine function / async generator
    (wrapped in :class:`~llmbridge.backends.CallableBackend`).

    The engine thread starts on first use (or :meth:`start`) in the process that uses it:
    after ``os.fork()`` the child's first submit starts a fresh thread, so
    ``gunicorn --preload`` workers each get a working engine.

    At most ``max_queued`` requests wait for a backend slot; beyond that :meth:`submit`
    raises :class:`Overloaded` at once. Every method is safe to call from any thread or
    event loop.

    >>> with Engine(lambda prompt: prompt[::-1]) as engine:  # doctest: +SKIP
    ...     engine.submit("abc").result().text
    'cba'
    """

    def __init__(
        self,
        backend: Backend | Callable[..., Any],
        /,
        *,
        max_queued: int = 1024,
        close_timeout: float = 30.0,
        name: str | None = None,
    ) -> None:
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
            raise ValueError(f"max_queued must be a positive int, got {max_queued!r}")
        if close_timeout < 0:
            raise ValueError(f"close_timeout must be >= 0, got {close_timeout!r}")
        if not isinstance(backend, Backend):
            if not callable(backend):
                raise TypeError(
                    "Engine() takes a Backend (such as backends.StepBackend) or a callable "
                    f"fn(prompt, **params), got {type(backend).__name__}"
                )
            from .drivers import CallableBackend

            backend = CallableBackend(backend)
        self.backend: Backend = backend
        self.max_queued = max_queued
        self.close_timeout = close_timeout
        self.name = name or f"llmbridge-engine-{next(_ids)}"
        self._reset()
        _engines.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._state = _NEW
        self._pid = os.getpid()
        self._queued = 0
        self._stats = EngineStats()
        self._jobs = JobQueue(self)
        self._thread: threading.Thread | None = None
        self._crashed: BaseException | None = None

    def __repr__(self) -> str:
        return f"<Engine {self.name!r} {self._state} queued={self._queued}>"

    # -- public API -------------------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        """Counters: submitted, completed, failed, cancelled, steps."""
        return self._stats

    @property
    def queued(self) -> int:
        """Requests admitted but not yet taken by the backend."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Requests the engine thread has taken that have not ended yet."""
        return self._jobs.in_flight

    @property
    def running(self) -> bool:
        """True while the engine thread is alive in this process."""
        return self._state == _RUNNING and self._pid == os.getpid()

    @property
    def thread(self) -> threading.Thread | None:
        """The engine thread, once started."""
        return self._thread

    def start(self) -> Engine:
        """Start the engine thread now instead of on first submit. Idempotent."""
        with self._lock:
            self._start_locked()
        return self

    def submit(self, prompt: str, /, *, request_id: str | None = None, **params: Any) -> Stream:
        """Admit a request and return its :class:`Stream`. Never blocks.

        ``request_id`` names the request in logs, the backend job and the stream
        (``stream.id``); by default the engine makes one. An id already in use by a live
        request of this engine gets a suffix (``"abc"``, then ``"abc.2"``), so ids stay unique.

        Raises :class:`Overloaded` if ``max_queued`` requests already wait,
        :class:`EngineClosed` once :meth:`close` began, :class:`BadRequest` if ``prompt``
        is not a ``str``. Safe from any thread and any event loop.
        """
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt must be a str, got {type(prompt).__name__}")
        with self._lock:
            if self._pid != os.getpid():
                self._after_fork()
            if self._state in (_CLOSING, _CLOSED):
                raise EngineClosed(f"{self.name} is closed")
            if self._queued >= self.max_queued:
                raise Overloaded(f"{self.name}: {self._queued} requests already queued")
            self._queued += 1
            jobs = self._jobs
            request = Request(self._unique_id(request_id), prompt, params)
            channel = Channel(request)
            job = Job(jobs, request, channel)
            channel.set_on_cancel(lambda: jobs._cancel(job))
            # Queued under the lock: a crashing engine thread swaps its queue under the
            # same lock, so a job lands either in the old queue (and is failed) or the new.
            jobs._commands.append((True, job))
            if self._state == _NEW:
                self._start_locked()
        jobs._notifier()  # outside the lock: waking a loop is a syscall
        return Stream(channel)

    def close(self, timeout: float | None = None) -> None:
        """Stop admitting, let in-flight requests finish, then stop the thread. Blocks.

        Requests still running after ``timeout`` seconds (default ``close_timeout``) end
        with :class:`EngineClosed`. Idempotent; don't call it from the engine thread.
        """
        if timeout is None:
            timeout = self.close_timeout
        with self._lock:
            if self._pid != os.getpid():
                self._after_fork()
            if self._state == _NEW:
                self._state = _CLOSED
                return
            if self._state == _RUNNING:
                self._state = _CLOSING
                self._jobs._close(time.monotonic() + timeout)
            thread = self._thread
        if thread is not None:
            if thread is threading.current_thread():
                raise RuntimeError("Engine.close() called from the engine thread")
            thread.join()
        with self._lock:
            self._state = _CLOSED

    async def aclose(self, timeout: float | None = None) -> None:
        """The async twin of :meth:`close`: waits in a worker thread, not on the loop."""
        import anyio.to_thread

        await anyio.to_thread.run_sync(self.close, timeout)

    # -- internals --------------------------------------------------------------------

    def _unique_id(self, wanted: str | None) -> str:
        # TODO(core): keep ids unique among this engine's live requests.
        return f"req-{next(_ids)}" if wanted is None else wanted

    def _left_queue(self) -> None:
        with self._lock:
            self._queued -= 1

    def _start_locked(self) -> None:
        if self._state != _NEW:
            return
        self._state = _RUNNING
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        jobs = self._jobs
        jobs._thread_id = threading.get_ident()
        try:
            self.backend.serve(jobs)
        except BaseException as exc:  # the backend's loop itself died
            logger.exception("%s: backend %r crashed", self.name, self.backend)
            with self._lock:
                self._crashed = exc
                self._fail_pending(jobs, exc)
                if self._state == _RUNNING:
                    # Recover: the next submit starts a fresh thread on a fresh queue.
                    self._jobs = JobQueue(self)
                    self._queued = 0
                    self._state = _NEW
            return

    def _fail_pending(self, jobs: JobQueue, exc: BaseException) -> None:
        from .._exceptions import BackendError

        error = BackendError(f"the engine's backend crashed: {exc!r}")
        error.__cause__ = exc
        jobs.take()
        for job in list(jobs._live.values()):
            job.fail(error)

    def _after_fork(self) -> None:
        # Only the forking thread survives a fork: the engine thread and every request
        # in flight stayed in the parent. Start over, lazily, in this process.
        closed = self._state in (_CLOSING, _CLOSED)
        self._reset()
        if closed:
            self._state = _CLOSED


def _reset_engines_in_child() -> None:
    for engine in list(_engines):
        engine._after_fork()


os.register_at_fork(after_in_child=_reset_engines_in_child)
