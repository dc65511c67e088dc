"""The engine: one thread per backend that alone ever touches it.

Callers only :meth:`Engine.submit` a request and receive a :class:`Stream`. Submitting
appends a command to the engine's inbox and never blocks; the engine thread takes the
commands between steps, so a cancellation reaches the backend within one step.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .._exceptions import BackendError, BadRequest, EngineClosed, Overloaded
from .._sansio.chat import chat_messages, render_messages
from .admission import DrainRate, estimate_tokens, request_priority, token_cost
from .closing import Closing
from .jobs import Backend, EngineStats, Job, JobQueue, JobSink
from .observe import Observer
from .stream import Channel, Request, Stream

__all__ = [
    "Backend",
    "Engine",
    "EngineStats",
    "Job",
    "JobQueue",
    "Submitter",
]

logger = logging.getLogger("llmbridge")

_ids = itertools.count(1)


@runtime_checkable
class Submitter(Protocol):
    """Anything that admits requests like :meth:`Engine.submit`: an engine, or an engine
    wrapped in policies. Integrations accept any submitter."""

    def submit(self, prompt: str, /, *, request_id: str | None = None, **params: Any) -> Stream: ...


_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"

#: The default ``max_unread``: characters of output one stream may hold for its reader.
DEFAULT_MAX_UNREAD = 1 << 20

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
    raises :class:`Overloaded` at once. With ``max_queued_tokens``, the waiting requests
    also hold at most that many tokens: each counts its prompt (by ``token_estimate``,
    default :func:`estimate_tokens`, characters / 4) plus the new tokens it asks for
    (``max_new_tokens`` or ``max_tokens``); a request that alone exceeds the bound is
    admitted only into an empty queue. A refusal's ``retry_after`` is how long the queue
    takes to make room at the rate it drained over the last 30 s (1 s when it has not
    drained at all, at most 300 s).

    A request's ``priority`` parameter (an int, default 0; higher goes first) orders the
    requests waiting for a slot, for every backend; it ages by ``priority_aging``
    seconds per level, so no request starves (see :class:`WaitingJobs`). Every method is
    safe to call from any thread or event loop.

    Memory per stream is bounded: once ``max_unread`` characters wait for a slow reader,
    the producer pauses (a step generator with ``pause``/``resume``, a worker thread, an
    async backend) or, for a step generator that can't pause, the request ends with
    :class:`SlowConsumer` (503); read text is released at once, and all of it when the
    stream closes. ``max_output`` caps one request's output in characters (for callables
    that ignore ``max_tokens``): the text is cut there and the request finishes with
    ``"length"``. ``None`` turns a bound off.

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
        max_queued_tokens: int | None = None,
        token_estimate: Callable[[str], int] = estimate_tokens,
        priority_aging: float = 1.0,
        max_unread: int | None = DEFAULT_MAX_UNREAD,
        max_output: int | None = None,
        close_timeout: float = 30.0,
        name: str | None = None,
    ) -> None:
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
            raise ValueError(f"max_queued must be a positive int, got {max_queued!r}")
        for option, value in (
            ("max_unread", max_unread),
            ("max_output", max_output),
            ("max_queued_tokens", max_queued_tokens),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{option} must be a positive int or None, got {value!r}")
        if not callable(token_estimate):
            raise TypeError(f"token_estimate must be callable, got {token_estimate!r}")
        if (
            isinstance(priority_aging, bool)
            or not isinstance(priority_aging, int | float)
            or not 0 < priority_aging < math.inf
        ):
            raise ValueError(
                f"priority_aging must be a number of seconds > 0, got {priority_aging!r}"
            )
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
        self.max_queued_tokens = max_queued_tokens
        self.token_estimate = token_estimate
        self.priority_aging = float(priority_aging)
        self.max_unread = max_unread
        self.max_output = max_output
        self.close_timeout = close_timeout
        self.name = name or f"llmbridge-engine-{next(_ids)}"
        self._observer: Observer | None = None
        self._reset()
        _engines.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._state = _NEW
        self._pid = os.getpid()
        self._queued = 0
        self._queued_tokens = 0
        self._drain_rate = DrainRate()
        self._stats = EngineStats()
        # Ids of live requests -> how many holders (a request's job, a pipeline's call).
        self._ids_in_use: dict[str, int] = {}
        self._jobs = self._new_queue()
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
    def observer(self) -> Observer | None:
        """Who is told of admissions, steps and request ends (:mod:`llmbridge.metrics`
        sets one); ``None``: nobody, at no cost. Set it before serving requests."""
        return self._observer

    @observer.setter
    def observer(self, observer: Observer | None) -> None:
        self._observer = observer
        self._jobs.observer = observer

    @property
    def queued(self) -> int:
        """Requests admitted but not yet taken by the backend."""
        return self._queued

    @property
    def queued_tokens(self) -> int:
        """Tokens the queued requests hold (counted only with ``max_queued_tokens``)."""
        return self._queued_tokens

    @property
    def in_flight(self) -> int:
        """Requests the engine thread has taken that have not ended yet."""
        return self._jobs.in_flight

    def local_load(self) -> tuple[int, int]:
        """``(in_flight, queued)`` of this engine in this process. Never blocks, also
        where ``in_flight`` and ``queued`` are another process's figures (an
        ``EngineClient``'s are the engine process's, over its socket)."""
        return self._jobs.in_flight, self._queued

    @property
    def running(self) -> bool:
        """True while the engine thread is alive in this process."""
        return self._state == _RUNNING and self._pid == os.getpid()

    @property
    def thread(self) -> threading.Thread | None:
        """The engine thread, once started."""
        return self._thread

    @property
    def closed(self) -> bool:
        """True once :meth:`close` began: the engine admits nothing any more."""
        return self._state in (_CLOSING, _CLOSED)

    @property
    def crashed(self) -> BaseException | None:
        """What ended the engine thread when its backend's serving loop died, until the
        next submit starts a fresh thread; else ``None``."""
        return self._crashed if self._pid == os.getpid() else None

    @property
    def stalled_for(self) -> float:
        """Seconds the engine thread has left its oldest command (a submit, a cancel, a
        :meth:`ping`) waiting. A healthy thread takes commands between two steps, so a
        value beyond one step's time means a step is stuck. 0.0 when not running."""
        return self._jobs.stalled_for if self.running else 0.0

    def ping(self) -> None:
        """Ask the engine thread to come by for its commands, so :attr:`stalled_for`
        measures it even while nobody submits. Never blocks; any thread."""
        if self.running:
            self._jobs.ping()

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

        Raises :class:`Overloaded` if ``max_queued`` requests already wait (or the
        request's tokens would take the queue past ``max_queued_tokens``),
        :class:`EngineClosed` once :meth:`close` began, :class:`BadRequest` if ``prompt``
        is not a ``str`` or ``priority`` not an int. Safe from any thread and any event
        loop.
        """
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt must be a str, got {type(prompt).__name__}")
        priority = request_priority(params)
        cost = token_cost(prompt, params, self.token_estimate, self.max_queued_tokens)
        with self._lock:
            if self._pid != os.getpid():
                self._after_fork()
            if self._state in (_CLOSING, _CLOSED):
                raise EngineClosed(f"{self.name} is closed")
            try:
                self._admit_locked(cost)
            except Overloaded:
                self._observe_rejected()
                raise
            request = Request(self._reserve_id_locked(request_id), prompt, params)
            channel = Channel(request, max_unread=self.max_unread)
            job = self._put_locked(request, channel, None, cost, priority)
            jobs = self._jobs
            channel.set_on_cancel(functools.partial(jobs.cancel, job))
        if self._observer is not None:
            self._observe(channel, None)
        jobs.notify()  # outside the lock: waking a loop is a syscall
        return Stream(channel)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        /,
        *,
        request_id: str | None = None,
        **params: Any,
    ) -> Stream:
        """Submit a chat: ``messages`` as OpenAI's ``[{"role", "content"}, ...]``. Never
        blocks; raises as :meth:`submit`.

        The backend gets ``messages`` in its params (an
        :class:`~llmbridge.backends.OpenAIBackend` sends them to ``/chat/completions``)
        and, as the prompt, the messages rendered by the default chat template
        (:func:`llmbridge.openai.render_messages`), for a backend that takes text.

        >>> engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=8)  # doctest: +SKIP
        """
        messages = chat_messages(messages)
        return self.submit(
            render_messages(messages), request_id=request_id, messages=messages, **params
        )

    # -- for a policy pipeline that writes into the engine's own request -------------

    def open_request(self, prompt: str, params: dict[str, Any], request_id: str | None) -> Channel:
        """Reserve a unique id now and return the channel the request's jobs will write
        to; the id stays reserved until the channel ends. Never blocks; any thread.

        A :class:`~llmbridge.policies.Pipeline` opens the request when its caller
        submits, runs its policies, then :meth:`submit_job` one or more attempts (a
        retry) into the same channel, so the caller's stream, the engine and the backend
        job share one id and one buffer.
        """
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt must be a str, got {type(prompt).__name__}")
        with self._lock:
            if self._pid != os.getpid():
                self._after_fork()
            request = Request(self._reserve_id_locked(request_id), prompt, params)
        channel = Channel(request, max_unread=self.max_unread)
        release = functools.partial(self._release_id, request.id, self._ids_in_use)
        if self._observer is None:
            channel.set_on_end(release)
        else:
            self._observe(channel, release)
        return channel

    def submit_job(self, channel: Channel, *, sink: JobSink | None = None) -> Job:
        """Admit one attempt at the request of a channel from :meth:`open_request`.

        The job writes its text straight into ``channel``; with a ``sink``, its end goes
        to the sink instead, which decides how the channel ends (or retries). Cancel it
        with :meth:`Job.cancel`. Raises :class:`Overloaded` and :class:`EngineClosed` like
        :meth:`submit`. Never blocks; any thread.
        """
        request = channel.request
        priority = request_priority(request.params)
        cost = token_cost(
            request.prompt, request.params, self.token_estimate, self.max_queued_tokens
        )
        with self._lock:
            if self._pid != os.getpid():
                self._after_fork()
            if self._state in (_CLOSING, _CLOSED):
                raise EngineClosed(f"{self.name} is closed")
            self._admit_locked(cost)
            # The job holds the id too: it may outlive the channel (a cancelled attempt
            # still in the generator), and no new request may take the id until it ends.
            self._ids_in_use[request.id] = self._ids_in_use.get(request.id, 0) + 1
            job = self._put_locked(request, channel, sink, cost, priority)
            jobs = self._jobs
        jobs.notify()
        return job

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
                self._jobs.close(time.monotonic() + timeout)
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

    def _observe(self, channel: Channel, release: Callable[[], None] | None) -> None:
        """Tell the observer of an admitted request now and of its end later."""
        observer = self._observer
        assert observer is not None

        def ended() -> None:
            if release is not None:
                release()
            try:
                observer.request_ended(channel)
            except Exception:
                logger.exception("%s: observer %r failed", self.name, observer)

        try:
            observer.request_admitted()
        except Exception:
            logger.exception("%s: observer %r failed", self.name, observer)
        channel.set_on_end(ended)

    def _observe_rejected(self) -> None:
        # Under the engine's lock: an observer only counts, it never calls back.
        observer = self._observer
        if observer is not None:
            try:
                observer.request_rejected(Overloaded("max_queued requests already queued"))
            except Exception:
                logger.exception("%s: observer %r failed", self.name, observer)

    def _new_queue(self) -> JobQueue:
        queue = JobQueue(
            self._stats,
            on_left_queue=self._left_queue,
            on_ended=self._job_ended,
            max_output=self.max_output,
        )
        queue.observer = self._observer
        return queue

    def _admit_locked(self, cost: int) -> None:
        if self._queued >= self.max_queued:
            self._stats.rejected += 1
            raise Overloaded(
                f"{self.name}: {self._queued} requests already queued",
                retry_after=self._drain_rate.retry_after(self._queued - self.max_queued + 1),
            )
        limit = self.max_queued_tokens
        if limit is not None and self._queued_tokens and self._queued_tokens + cost > limit:
            self._stats.rejected += 1
            raise Overloaded(
                f"{self.name}: {self._queued_tokens} tokens already queued, "
                f"this request needs {cost} more (max_queued_tokens={limit})",
                retry_after=self._drain_rate.retry_after(
                    self._queued_tokens + cost - limit, tokens=True
                ),
            )

    def _put_locked(
        self, request: Request, channel: Channel, sink: JobSink | None, cost: int, priority: int
    ) -> Job:
        self._queued += 1
        self._queued_tokens += cost
        jobs = self._jobs
        job = Job(jobs, request, channel, sink)
        job.cost = cost
        if priority:
            job.rank = request.submitted_at - priority * self.priority_aging
        # Queued under the lock: a crashing engine thread swaps its queue under the
        # same lock, so a job lands either in the old queue (and is failed) or the new.
        jobs.put(job)
        if self._state == _NEW:
            self._start_locked()
        return job

    def _reserve_id_locked(self, wanted: str | None) -> str:
        # Step generators key their jobs by identifier: two live requests with one id
        # would mix their streams. The rule: an id in use gets the first free suffix
        # (".2", ".3", ...); our own ids ("req-N") are fresh by construction.
        in_use = self._ids_in_use
        if wanted is None:
            wanted = f"req-{next(_ids)}"
        elif wanted in in_use:
            n = 2
            while f"{wanted}.{n}" in in_use:
                n += 1
            wanted = f"{wanted}.{n}"
        in_use[wanted] = 1
        return wanted

    def _release_id(self, request_id: str, in_use: dict[str, int]) -> None:
        # ``in_use`` is passed in, not read from self: after a fork the engine has a
        # fresh table, and a holder from before must not release an id in it.
        with self._lock:
            n = in_use.get(request_id, 0)
            if n <= 1:
                in_use.pop(request_id, None)
            else:
                in_use[request_id] = n - 1

    def _job_ended(self, job: Job) -> None:
        self._release_id(job.request.id, self._ids_in_use)
        observer = self._observer
        if observer is not None:
            try:
                observer.job_ended()
            except Exception:
                logger.exception("%s: observer %r failed", self.name, observer)

    def _left_queue(self, job: Job) -> None:
        with self._lock:
            self._queued -= 1
            self._queued_tokens -= job.cost
            if job.started:
                self._drain_rate.record(job.cost)

    def _start_locked(self) -> None:
        if self._state != _NEW:
            return
        self._state = _RUNNING
        self._crashed = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        jobs = self._jobs
        jobs.thread_id = threading.get_ident()
        try:
            self.backend.serve(jobs)
        except BaseException as exc:  # the backend's loop itself died
            with self._lock:
                self._crashed = exc
                if self._state == _RUNNING:
                    # Recover: the next submit starts a fresh thread on a fresh queue.
                    self._jobs = self._new_queue()
                    self._queued = 0
                    self._queued_tokens = 0
                    self._state = _NEW
            # Nothing reaches the old queue now (submits go to the new one); what it
            # holds fails outside the lock, since ending a job takes the lock.
            jobs._on_left_queue = _nothing
            self._fail_pending(jobs, exc)

    def _fail_pending(self, jobs: JobQueue, exc: BaseException) -> None:
        jobs.take()
        ids = ", ".join(sorted(job.id for job in jobs._live)) or "none"
        # Logged once, here, with every request it fails; clients get public_message.
        logger.error(
            "%s: backend %r crashed; failing requests: %s",
            self.name,
            self.backend,
            ids,
            exc_info=exc,
        )
        error = BackendError(f"the engine's backend crashed: {exc!r}")
        error.__cause__ = exc
        jobs.expire(error)
        jobs.flush()

    def _after_fork(self) -> None:
        # Only the forking thread survives a fork: the engine thread and every request
        # in flight stayed in the parent. Start over, lazily, in this process.
        closed = self._state in (_CLOSING, _CLOSED)
        self._reset()
        if closed:
            self._state = _CLOSED


def _nothing(*_: object) -> None:
    pass


def _reset_engines_in_child() -> None:
    for engine in list(_engines):
        engine._after_fork()


os.register_at_fork(after_in_child=_reset_engines_in_child)
