"""Backends the engine drives: step generators, and plain sync or async callables.

Both run only on the engine thread (or, for blocking calls, in the engine's bounded
worker pool), so the backend object is never entered by two request threads at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import aclosing
from typing import Any, Protocol, runtime_checkable

from .._exceptions import Cancelled, EngineClosed, LLMBridgeError
from .admission import WaitingJobs
from .channel import Request
from .jobs import Job, JobQueue, wrap_error
from .pieces import Ending, is_piece, read_piece
from .wakeups import loop_waker

__all__ = [
    "AsyncBackend",
    "CallableBackend",
    "StepBackend",
    "StepGenerator",
    "serve_async",
]

logger = logging.getLogger("llmbridge")


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _wrap_error(exc: BaseException, what: str, job: Job | None = None) -> BaseException:
    return wrap_error(exc, what, None if job is None else job.id)


def _wrap_shared(exc: BaseException, what: str, jobs: list[Job]) -> BaseException:
    """One backend error that fails several requests: logged once, naming them all."""
    if jobs and not isinstance(exc, LLMBridgeError):
        logger.error("requests %s: %s", ", ".join(j.id for j in jobs), what, exc_info=exc)
    return wrap_error(exc, what)


@runtime_checkable
class StepGenerator(Protocol):
    """An ExLlamaV2-style batching generator: not thread-safe, driven one step at a time.

    ``enqueue(job)`` adds a job; ``iterate()`` advances every job by one step and
    returns result dicts carrying ``identifier`` (or the ``job`` itself), ``text`` and
    ``eos``, optionally ``eos_reason``, ``new_tokens``, ``prompt_tokens`` or ``error``;
    ``cancel(job)`` drops a job. A generator that can also ``pause(job)`` and
    ``resume(job)`` (skip a job in ``iterate()`` until resumed) lets a slow reader hold
    its own job back instead of being ended at ``max_unread``.
    """

    def enqueue(self, job: Any) -> Any: ...

    def iterate(self) -> list[dict[str, Any]]: ...

    def cancel(self, job: Any) -> Any: ...


_LENGTH_REASONS = frozenset({"max_new_tokens", "length", "max_tokens"})


class StepBackend:
    """Drives a :class:`StepGenerator` from the engine thread, many jobs in flight.

    ``make_job(request)`` builds the generator's job from a :class:`~llmbridge.Request`
    (use ``request.id`` as the job's identifier). Up to ``max_batch_size`` jobs are in
    the generator at once; the rest wait in the engine's queue. A consumer's
    cancellation reaches ``generator.cancel`` before the next ``iterate()``. An
    exception from ``make_job`` or a result's ``error`` fails only that request; one
    from ``iterate()`` fails the requests in flight, and the engine goes on serving.

    >>> from llmbridge.testing import SimulatedGenerator
    >>> gen = SimulatedGenerator()
    >>> backend = StepBackend(gen, gen.make_job, max_batch_size=32)
    """

    def __init__(
        self,
        generator: StepGenerator,
        make_job: Callable[[Request], Any],
        *,
        max_batch_size: int = 64,
    ) -> None:
        missing = [
            m for m in ("enqueue", "iterate", "cancel") if not callable(getattr(generator, m, None))
        ]
        if missing:
            raise TypeError(
                "StepBackend needs a generator with enqueue(), iterate() and cancel(); "
                f"{type(generator).__name__} lacks {', '.join(m + '()' for m in missing)}"
            )
        if not callable(make_job):
            raise TypeError("make_job must be callable: make_job(request) -> job")
        self.generator = generator
        self.make_job = make_job
        self.max_batch_size = _positive("max_batch_size", max_batch_size)
        # Kept on the instance so a restarted serve() (after a crash or a fork) can clean up.
        self._active: dict[str, Job] = {}
        self._paused: dict[str, Job] = {}
        self._can_pause = callable(getattr(generator, "pause", None)) and callable(
            getattr(generator, "resume", None)
        )

    def __repr__(self) -> str:
        return f"StepBackend({self.generator!r}, max_batch_size={self.max_batch_size})"

    def _drop(self, job: Job) -> None:
        self._active.pop(job.id, None)
        self._paused.pop(job.id, None)
        try:
            self.generator.cancel(job.handle)
        except Exception:
            logger.exception("generator.cancel() failed for %s", job.id)

    def serve(self, jobs: JobQueue) -> None:
        """Run the step loop on the engine thread until the engine closes."""
        generator = self.generator
        active = self._active
        paused = self._paused
        # Jobs left by a previous serve() (it crashed, or we are a forked child whose
        # parent had them in flight) are nobody's now: take them out of the generator.
        for job in list(active.values()):
            job.fail(EngineClosed("the engine restarted"))
            self._drop(job)
        paused.clear()
        by_handle: dict[int, Job] = {}
        waiting = WaitingJobs()  # by priority, aged: see WaitingJobs
        while True:
            new, stop = jobs.take()
            waiting.extend(new)
            for job in stop:
                if active.get(job.id) is job:
                    by_handle.pop(id(job.handle), None)
                    self._drop(job)
            if jobs.expired:
                jobs.expire(EngineClosed("the engine closed before the request finished"))
                for job in list(active.values()):
                    self._drop(job)
                by_handle.clear()
                waiting.clear()
            if paused:
                self._resume_ready(jobs)
            while waiting and len(active) < self.max_batch_size:
                job = waiting.popleft()
                if job.ended:
                    jobs.drop(job)  # idempotent: its consumer left while it waited
                    continue
                job.start()
                try:
                    job.handle = self.make_job(job.request)
                    generator.enqueue(job.handle)
                except Exception as exc:
                    job.fail(_wrap_error(exc, "could not start the job", job))
                    continue
                active[job.id] = job
                by_handle[id(job.handle)] = job
            if len(paused) == len(active):  # nothing to step: every job waits on a reader
                jobs.flush()
                if jobs.closing and not waiting and not active:
                    return
                jobs.wait()
                continue
            batch_size = len(active) - len(paused)
            try:
                results = generator.iterate()
            except Exception as exc:
                failed = list(active.values())
                error = _wrap_shared(exc, "the generator's iterate() failed", failed)
                for job in failed:
                    job.fail(error)
                    self._drop(job)
                by_handle.clear()
                jobs.step(batch_size)
                continue
            for result in results:
                self._route(result, jobs, by_handle)
            jobs.step(batch_size)

    def _resume_ready(self, jobs: JobQueue) -> None:
        for job in list(self._paused.values()):
            if job.ended or not job.full:
                del self._paused[job.id]
                if not job.ended:
                    self.generator.resume(job.handle)  # type: ignore[attr-defined]

    def _hold_back(self, job: Job, jobs: JobQueue, by_handle: dict[int, Job]) -> None:
        """``job``'s reader is ``max_unread`` behind: pause it, or end it if we can't."""
        if self._can_pause:
            self.generator.pause(job.handle)  # type: ignore[attr-defined]
            self._paused[job.id] = job
            job.channel.set_on_space(jobs.notify)
        else:
            job.fail_slow_consumer()
            by_handle.pop(id(job.handle), None)
            self._drop(job)

    def _route(self, result: dict[str, Any], jobs: JobQueue, by_handle: dict[int, Job]) -> None:
        active = self._active
        identifier = result.get("identifier")
        job = active.get(identifier) if isinstance(identifier, str) else None
        if job is None and "job" in result:
            job = by_handle.get(id(result["job"]))
        if job is None:
            return  # a job we already dropped (cancelled, failed) still reported in
        error = result.get("error")
        if error is not None:
            job.fail(
                _wrap_error(error, "the generator failed the job", job)
                if isinstance(error, BaseException)
                else _wrap_error(RuntimeError(str(error)), "the generator failed the job", job)
            )
            self._forget(job, by_handle)
            return
        text = result.get("text") or ""
        token_ids = result.get("token_ids")
        tokens = len(token_ids) if token_ids is not None else (1 if text else 0)
        if (text or tokens) and not job.emit(text, tokens):
            by_handle.pop(id(job.handle), None)
            self._drop(job)  # its consumer went away mid-step, or it hit max_output
            return
        if result.get("eos"):
            reason = str(result.get("eos_reason") or "stop")
            job.finish(
                "length" if reason in _LENGTH_REASONS else "stop",
                prompt_tokens=_int_or_none(result.get("prompt_tokens")),
                completion_tokens=_int_or_none(result.get("new_tokens")),
            )
            self._forget(job, by_handle)
        else:
            channel = job.channel  # Channel.full, inlined: this runs once per token
            bound = channel.max_unread
            if bound is not None and channel._unread >= bound:
                self._hold_back(job, jobs, by_handle)

    def _forget(self, job: Job, by_handle: dict[int, Job]) -> None:
        self._active.pop(job.id, None)
        self._paused.pop(job.id, None)
        by_handle.pop(id(job.handle), None)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@runtime_checkable
class AsyncBackend(Protocol):
    """A backend written as a coroutine per request, run on the engine's own event loop.

    ``generate(request, job)`` writes with ``job.emit(text)`` and may return (the engine
    then finishes the job with ``"stop"``) or call ``job.finish(...)`` itself. The task
    is cancelled when the consumer goes away. Blocking work inside must go to a thread
    (``anyio.to_thread.run_sync``): the loop is shared by every request of the engine.
    Optional ``aopen()`` / ``aclose()`` run on the engine loop at start and shutdown (open
    a pooled HTTP client there), and ``max_concurrency`` caps requests in flight.
    """

    async def generate(self, request: Request, job: Job) -> None: ...


def serve_async(backend: AsyncBackend, jobs: JobQueue, *, max_concurrency: int) -> None:
    """Run ``backend`` on a fresh event loop on the engine thread until the engine closes:
    uvloop's when it is installed (as uvicorn's ``--loop auto`` picks), else asyncio's."""
    with asyncio.Runner(loop_factory=engine_loop_factory()) as runner:
        runner.run(_AsyncDriver(backend, jobs, max_concurrency).main())


def engine_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop an async backend runs on: uvloop's when it is installed (its loop
    costs a streamed chunk about half of what asyncio's pure-Python selector loop does;
    ``benchmarks/upstream_clients.py``), else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


class _AsyncDriver:
    def __init__(self, backend: AsyncBackend, jobs: JobQueue, max_concurrency: int) -> None:
        self.backend = backend
        self.jobs = jobs
        self.max_concurrency = max_concurrency
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.waiting = WaitingJobs()  # by priority, aged: see WaitingJobs

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        flush_pending = False

        def flush() -> None:
            nonlocal flush_pending
            flush_pending = False
            self.jobs.flush()

        def schedule_flush() -> None:  # engine thread: one wake-up flush per loop pass
            nonlocal flush_pending
            if not flush_pending:
                flush_pending = True
                loop.call_soon(flush)

        jobs = self.jobs
        jobs.set_flush_hook(schedule_flush)
        jobs.set_notifier(loop_waker(loop, wake))
        opener = getattr(self.backend, "aopen", None)
        if opener is not None:
            await opener()
        try:
            while True:
                new, stop = jobs.take()
                self.waiting.extend(new)
                for job in stop:
                    task = self.tasks.get(job.id)
                    if task is not None:
                        task.cancel()
                if jobs.expired:
                    jobs.expire(EngineClosed("the engine closed before the request finished"))
                    for task in self.tasks.values():
                        task.cancel()
                    self.waiting.clear()
                while self.waiting and len(self.tasks) < self.max_concurrency:
                    job = self.waiting.popleft()
                    if job.ended:
                        jobs.drop(job)  # idempotent: its consumer left while it waited
                        continue
                    job.start()
                    task = loop.create_task(self._run(job))
                    self.tasks[job.id] = task
                    task.add_done_callback(lambda _: wake.set())
                if jobs.closing and not self.tasks and not self.waiting:
                    break
                timeout = None
                if jobs.deadline is not None and not jobs.expired:
                    # Wake at the close deadline to cancel what is still running.
                    timeout = max(0.0, jobs.deadline - time.monotonic()) + 0.001
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    pass
                wake.clear()
        finally:
            closer = getattr(self.backend, "aclose", None)
            if closer is not None:
                try:
                    await closer()
                except Exception:
                    logger.exception("%r.aclose() failed", self.backend)
            jobs.flush()

    async def _run(self, job: Job) -> None:
        try:
            await self.backend.generate(job.request, job)
        except asyncio.CancelledError:
            job.fail(Cancelled("the request was cancelled"))
        except Exception as exc:
            job.fail(_wrap_error(exc, "the backend failed", job))
        else:
            job.finish("stop")
        finally:
            if self.tasks.get(job.id) is asyncio.current_task():
                del self.tasks[job.id]
            self.jobs.flush()


class CallableBackend:
    """Runs a plain callable per request: ``fn(prompt, **params)``.

    ``fn`` may return a ``str``, return or yield an iterable of ``str`` chunks, or be a
    coroutine function or async generator function. A chunk (or the value returned) may
    also be an object that says how the answer ended: an OpenAI SDK response or stream
    chunk, or anything with ``text`` / ``finish_reason`` / ``prompt_tokens`` /
    ``completion_tokens`` (see :mod:`llmbridge._core.pieces`), so a callable wrapping
    another client reports ``"length"`` when ``max_tokens`` cut the answer; with plain
    ``str`` the request finishes with ``"stop"`` and no prompt token count. Async
    callables run on the engine's own event loop, so an async client created on first use
    there (an ``httpx.AsyncClient``) is shared and pooled by every request. Sync callables
    run in a bounded pool of ``max_threads`` worker threads, never on the loop; a sync generator is
    closed between chunks once its consumer goes away, and waits between chunks while its
    reader is ``max_unread`` characters behind (an async generator awaits instead).
    ``max_concurrency`` caps requests in flight; the rest wait in the engine's queue, by
    ``priority`` (which ``fn`` does not receive).

    >>> def echo(prompt: str) -> str:
    ...     return prompt
    >>> backend = CallableBackend(echo, max_threads=4)
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        max_concurrency: int = 256,
        max_threads: int = 16,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"CallableBackend needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.max_concurrency = _positive("max_concurrency", max_concurrency)
        self.max_threads = _positive("max_threads", max_threads)
        self._limiter: Any = None

    def __repr__(self) -> str:
        return f"CallableBackend({getattr(self.fn, '__qualname__', self.fn)!r})"

    def serve(self, jobs: JobQueue) -> None:
        """Run requests on a fresh event loop on the engine thread."""
        serve_async(self, jobs, max_concurrency=self.max_concurrency)

    async def aopen(self) -> None:
        """Create the bounded worker pool's limiter on the engine loop."""
        import anyio

        self._limiter = anyio.CapacityLimiter(self.max_threads)

    async def generate(self, request: Request, job: Job) -> None:
        """Run ``fn`` for one request and write what it produces to ``job``."""
        fn = self.fn
        ending = Ending()
        if inspect.isasyncgenfunction(fn):
            async with aclosing(fn(request.prompt, **_call_params(request))) as agen:
                await _emit_async(agen, job, ending)
        elif inspect.iscoroutinefunction(fn):
            result = await fn(request.prompt, **_call_params(request))
            if isinstance(result, AsyncIterator):
                await _emit_async(result, job, ending)
            else:
                _emit_result(result, job, ending)
        else:
            from .._runtime.offload import run_in_thread

            # If the consumer leaves, this task is cancelled and stops waiting, but the
            # call keeps its pool slot until its thread really returns (run_in_thread's
            # contract); the worker stops at its next chunk now that the job has ended.
            await run_in_thread(_run_sync, fn, request, job, ending, limiter=self._limiter)
        _finish(job, ending)


def _finish(job: Job, ending: Ending) -> None:
    if ending.reported:
        job.finish(
            ending.finish_reason or "stop",
            prompt_tokens=ending.prompt_tokens,
            completion_tokens=ending.completion_tokens,
        )


async def _emit_async(chunks: AsyncIterator[Any], job: Job, ending: Ending) -> None:
    async for chunk in chunks:
        if not await job.aemit(read_piece(chunk, ending)):
            return


def _emit_result(result: Any, job: Job, ending: Ending, *, on_worker: bool = False) -> None:
    if isinstance(result, str):
        job.emit(result)
    elif isinstance(result, Iterable) and not is_piece(result):
        # A worker thread waits here while the reader is max_unread behind; the loop
        # (a coroutine's result: already all in memory) must not.
        emit = job.emit_or_wait if on_worker else job.emit
        for chunk in result:
            if not emit(read_piece(chunk, ending)):
                return
    elif isinstance(result, Awaitable):
        raise TypeError("the callable returned an awaitable: declare it with async def")
    else:
        try:
            text = read_piece(result, ending)
        except TypeError:
            raise TypeError(
                f"the callable returned {type(result).__name__}, expected str or chunks"
            ) from None
        job.emit(text)


def _run_sync(fn: Callable[..., Any], request: Request, job: Job, ending: Ending) -> None:
    result = fn(request.prompt, **_call_params(request))
    if isinstance(result, Iterator) and hasattr(result, "close"):
        try:
            _emit_result(result, job, ending, on_worker=True)
        finally:
            result.close()
    else:
        _emit_result(result, job, ending, on_worker=True)


def _call_params(request: Request) -> dict[str, Any]:
    # ``priority`` is the engine queue's, not a sampling parameter: a plain
    # ``fn(prompt, max_new_tokens=...)`` must not get it.
    params = request.params
    if "priority" in params:
        params = {k: v for k, v in params.items() if k != "priority"}
    return params
