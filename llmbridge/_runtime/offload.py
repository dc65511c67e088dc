"""Bounded offload of blocking calls to worker threads and worker processes.

Two layers:

* :func:`run_in_thread` (anyio worker threads under a :class:`anyio.CapacityLimiter`)
  and :func:`run_in_process` (:mod:`llmbridge._runtime.processes`) are awaitables for
  code already on an event loop (the engine's drivers, Quart);
* an :class:`Offloader` owns one bounded thread pool and one bounded process pool and
  serves both kinds of caller from them: a Flask request thread calls
  :meth:`~Offloader.call_in_thread` and waits on the pool directly (no event loop in
  between), a coroutine awaits :meth:`~Offloader.arun_in_thread`.

A ``timeout`` becomes :class:`~llmbridge.Timeout` (504). What happens to the call that
timed out differs, and is what keeps abandoned calls from piling up:

* **process**: the worker process is killed, and a new one takes its place;
* **thread**: a thread can't be killed, so it runs on, *still holding its pool slot*,
  until the function returns. A pool of ``N`` threads therefore never has more than
  ``N`` calls running, abandoned or not; new calls wait for a slot (and time out
  waiting if the pool stays stuck). A call that timed out before it started never runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import enum
import functools
import math
import os
import threading
from collections.abc import Callable
from typing import Any, Final, Generic, Literal, ParamSpec, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

from .._exceptions import Timeout
from .processes import (
    OffloadError,
    ProcessPool,
    RemoteError,
    _call_original,
    _check_timeout,
    _name,
    run_in_process,
)

__all__ = [
    "DEFAULT",
    "OffloadError",
    "Offloaded",
    "Offloader",
    "ProcessOffloaded",
    "RemoteError",
    "TimeoutArg",
    "run_in_process",
    "run_in_thread",
]

T = TypeVar("T")
P = ParamSpec("P")

# anyio's thread pool needs a limiter; the real bound is the caller's limiter, held for
# the whole life of the call (see run_in_thread), so anyio's own must never be the one
# that waits. One per event loop, like anyio's default limiter.
_unbounded: RunVar[anyio.CapacityLimiter] = RunVar("llmbridge_unbounded_thread_limiter")


class _Default(enum.Enum):
    DEFAULT = "default"


DEFAULT: Final = _Default.DEFAULT
"""``timeout=DEFAULT``: use the :class:`Offloader`'s default timeout."""

TimeoutArg = float | None | Literal[_Default.DEFAULT]


def _unbounded_limiter() -> anyio.CapacityLimiter:
    try:
        return _unbounded.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(math.inf)
        _unbounded.set(limiter)
        return limiter


class _Borrow:
    """One call's limiter token, released exactly once: by the awaiting task when the
    call ends while it still waits, or by the worker thread when the task gave up."""

    __slots__ = ("_abandoned", "_finished", "_lock", "_loop_call", "_released", "limiter")

    def __init__(self, limiter: anyio.CapacityLimiter, loop_call: Callable[..., Any]) -> None:
        self.limiter = limiter
        self._loop_call = loop_call
        self._lock = threading.Lock()
        self._finished = False
        self._abandoned = False
        self._released = False

    def release_here(self) -> None:
        # On the event loop: CapacityLimiter is not thread-safe.
        if not self._released:
            self._released = True
            self.limiter.release_on_behalf_of(self)

    def worker_done(self) -> None:
        """In the worker thread, when the function returned or raised."""
        with self._lock:
            self._finished = True
            abandoned = self._abandoned
        if abandoned:
            try:
                self._loop_call(self.release_here)
            except RuntimeError:
                pass  # the loop is gone, and with it the limiter

    def abandon(self) -> None:
        """On the loop, when the awaiting task stopped waiting (timeout, cancellation)."""
        with self._lock:
            finished = self._finished
            self._abandoned = not finished
        if finished:
            self.release_here()


async def run_in_thread(
    fn: Callable[..., T],
    /,
    *args: Any,
    timeout: float | None = None,
    limiter: anyio.CapacityLimiter | None = None,
    **kwargs: Any,
) -> T:
    """Call ``fn(*args, **kwargs)`` in a worker thread and wait for it without blocking.

    At most ``limiter.total_tokens`` calls run at once (default: anyio's default thread
    limiter of this loop); a call keeps its token until ``fn`` really returns, even after
    its caller gave up, so abandoned calls can never exceed the pool. ``timeout`` (seconds,
    including the wait for a token) raises :class:`~llmbridge.Timeout`; cancelling the
    awaiting task abandons the call the same way. The worker runs in a copy of the
    caller's :mod:`contextvars` context. ``fn``'s own exceptions propagate unchanged.

    Pass options named ``timeout`` or ``limiter`` to ``fn`` with :func:`functools.partial`.
    anyio keeps worker threads for the lifetime of the calling task tree: a task that
    lives long (a server's, an engine driver's) reuses them; for one-off tasks (such as
    ``BackgroundLoop.spawn``) use an :class:`Offloader`, whose pool outlives any task.
    """
    _check_timeout(timeout)
    return await _run_in_thread(fn, args, kwargs, timeout, limiter)


async def _run_in_thread(
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
    limiter: anyio.CapacityLimiter | None,
) -> T:
    if limiter is None:
        limiter = anyio.to_thread.current_default_thread_limiter()
    loop_call = _loop_caller()
    borrow = _Borrow(limiter, loop_call)
    call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)

    def work() -> T:
        try:
            return call()
        finally:
            borrow.worker_done()

    acquired = False
    try:
        with anyio.fail_after(timeout):
            await limiter.acquire_on_behalf_of(borrow)
            acquired = True
            result = await anyio.to_thread.run_sync(
                work, abandon_on_cancel=True, limiter=_unbounded_limiter()
            )
    except TimeoutError:
        raise Timeout(f"{_name(fn)} did not finish within {timeout} s") from None
    finally:
        if acquired:
            borrow.abandon()
    return result


def _loop_caller() -> Callable[..., Any]:
    return asyncio.get_running_loop().call_soon_threadsafe


class Offloaded(Generic[P, T]):
    """``fn`` wrapped to run in a worker thread of an :class:`Offloader` when called.

    Calling it blocks the calling thread (never call it on an event loop: await
    :meth:`acall` there) until the result is back; raises what ``fn`` raises, or
    :class:`~llmbridge.Timeout`.
    """

    __wrapped__: Callable[P, T]

    def __init__(self, offloader: Offloader, fn: Callable[P, T], timeout: TimeoutArg) -> None:
        functools.update_wrapper(self, fn)
        self._offloader = offloader
        self._timeout = timeout

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._offloader.call_in_thread(
            self.__wrapped__, *args, timeout=self._timeout, **kwargs
        )

    async def acall(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """The async twin of calling it: awaits the worker thread on the running loop."""
        return await self._offloader.arun_in_thread(
            self.__wrapped__, *args, timeout=self._timeout, **kwargs
        )


class ProcessOffloaded(Offloaded[P, T]):
    """``fn`` wrapped to run in a worker process of an :class:`Offloader` when called.

    Decorating a module-level function replaces it in its module, so the wrapper pickles
    by name (as a function does) and the worker process calls the original through it.
    """

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        result: T = self._offloader.call_in_process(
            functools.partial(_call_original, self), args, kwargs, timeout=self._timeout
        )
        return result

    async def acall(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """The async twin of calling it: awaits the worker process on the running loop."""
        result: T = await self._offloader.arun_in_process(
            functools.partial(_call_original, self), args, kwargs, timeout=self._timeout
        )
        return result

    def __reduce__(self) -> str:
        # A string tells pickle "the module global of this name"; pickle checks that the
        # name still leads to this very object.
        return str(self.__qualname__)  # type: ignore[attr-defined]


def _refuse_on_loop(name: str, instead: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{name}() blocks and would stall this event loop: await {instead}()")


class Offloader:
    """Bounded thread and process pools for blocking calls, usable from any thread.

    At most ``max_threads`` worker threads and ``max_processes`` worker processes
    (default: one per CPU) run calls at once, whoever calls; ``timeout`` is the default
    per call (``None``: wait as long as it takes). Both pools start on first use.

    The blocking methods (:meth:`call_in_thread`, :meth:`call_in_process` and the
    wrappers :meth:`thread` / :meth:`process` make) wait on the pool from the calling
    thread; on an event loop, await :meth:`arun_in_thread` / :meth:`arun_in_process`
    instead (same pools, same bounds). Thread-safe; fork-safe (a forked child starts
    with fresh pools).
    """

    def __init__(
        self,
        *,
        max_threads: int = 40,
        max_processes: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._processes: ProcessPool | None = None
        self.configure(max_threads=max_threads, max_processes=max_processes, timeout=timeout)

    def configure(
        self,
        *,
        max_threads: int = 40,
        max_processes: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Set the pool sizes and default timeout. Pools already started keep their
        size (a forked child starts new ones, with the new size); the timeout applies
        to the next call."""
        if max_processes is None:
            max_processes = os.cpu_count() or 2
        for name, value in (("max_threads", max_threads), ("max_processes", max_processes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_timeout(timeout)
        self.max_threads = max_threads
        self.max_processes = max_processes
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<Offloader threads={self.max_threads} processes={self.max_processes}>"

    def _forked(self) -> None:
        # Under self._lock. The parent's pool threads and workers aren't in this process.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._threads = None
            self._processes = None

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            self._forked()
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(
                    self.max_threads, thread_name_prefix="llmbridge-offload"
                )
            return self._threads

    def _process_pool(self) -> ProcessPool:
        with self._lock:
            self._forked()
            if self._processes is None:
                self._processes = ProcessPool(self.max_processes)
            return self._processes

    def _resolve(self, timeout: TimeoutArg) -> float | None:
        resolved = self.timeout if timeout is DEFAULT else timeout
        _check_timeout(resolved)
        return resolved

    def _submit_thread(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> concurrent.futures.Future[T]:
        # The worker runs in a copy of the caller's context: Flask's request context,
        # a request id in a contextvar.
        context = contextvars.copy_context()
        return self._thread_pool().submit(context.run, fn, *args, **kwargs)

    # -- blocking: from a thread, straight to the pool ---------------------------------

    def call_in_thread(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """Run ``fn(*args, **kwargs)`` in a pool thread; block until it is done.

        ``fn`` runs in a copy of the calling thread's :mod:`contextvars` context, so it
        sees Flask's request and app context. Raises what ``fn`` raises, or
        :class:`~llmbridge.Timeout` after ``timeout`` seconds, counting the wait for a
        free thread (a call still queued then never runs; one already running runs on,
        holding its pool slot). Raises ``RuntimeError`` on an event loop.
        """
        _refuse_on_loop("call_in_thread", "arun_in_thread")
        seconds = self._resolve(timeout)
        future = self._submit_thread(fn, args, kwargs)
        try:
            return future.result(seconds)
        except concurrent.futures.TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()  # finished just now: the caller gets it
            raise Timeout(f"{_name(fn)} did not finish within {seconds} s") from None
        finally:
            future.cancel()  # only a call that hasn't started yet: it never will

    def call_in_process(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """Run ``fn(*args, **kwargs)`` in a pool process; block until it is done.

        Raises what ``fn`` raises (or :class:`RemoteError` when its exception can't
        cross back), :class:`~llmbridge.Timeout` (the worker process is killed), or
        :class:`OffloadError` when the worker dies or the call can't be pickled. Raises
        ``RuntimeError`` on an event loop.
        """
        _refuse_on_loop("call_in_process", "arun_in_process")
        result: T = self._process_pool().call(fn, *args, timeout=self._resolve(timeout), **kwargs)
        return result

    # -- async: on the caller's running loop, same pools -------------------------------

    async def arun_in_thread(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """The async twin of :meth:`call_in_thread`: awaits the pool thread on the running
        asyncio loop. Cancelling the awaiting task abandons the call like a timeout."""
        seconds = self._resolve(timeout)
        future = self._submit_thread(fn, args, kwargs)
        try:
            with anyio.fail_after(seconds):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            raise Timeout(f"{_name(fn)} did not finish within {seconds} s") from None
        finally:
            future.cancel()

    async def arun_in_process(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """The async twin of :meth:`call_in_process`: awaits the worker process on the
        running asyncio loop; cancelling the awaiting task kills the worker."""
        result: T = await self._process_pool().acall(
            fn, *args, timeout=self._resolve(timeout), **kwargs
        )
        return result

    # -- decorators -------------------------------------------------------------------

    def thread(
        self, *, timeout: TimeoutArg = DEFAULT
    ) -> Callable[[Callable[P, T]], Offloaded[P, T]]:
        """Decorator: calling the function runs it with :meth:`call_in_thread`."""

        def decorate(fn: Callable[P, T]) -> Offloaded[P, T]:
            return Offloaded(self, fn, timeout)

        return decorate

    def process(
        self, *, timeout: TimeoutArg = DEFAULT
    ) -> Callable[[Callable[P, T]], ProcessOffloaded[P, T]]:
        """Decorator: calling the function runs it with :meth:`call_in_process`.

        Decorate module-level functions only (the worker process imports them by name).
        """

        def decorate(fn: Callable[P, T]) -> ProcessOffloaded[P, T]:
            return ProcessOffloaded(self, fn, timeout)

        return decorate

    def close(self) -> None:
        """Stop the worker processes and let idle pool threads exit. Running thread
        calls finish on their own. Idempotent; the pools start again on next use."""
        with self._lock:
            self._forked()
            threads, self._threads = self._threads, None
            processes, self._processes = self._processes, None
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)
        if processes is not None:
            processes.close()
