"""Bounded offload of blocking calls to worker threads and worker processes.

The async core (:func:`run_in_thread`, :func:`run_in_process`) is shared by every
integration: Quart awaits it on its own loop, Flask reaches it through an
:class:`Offloader`, whose blocking methods run it on the process's background loop
(:mod:`llmbridge._portal`).

Both build on anyio's worker threads and worker processes and bound them with
:class:`anyio.CapacityLimiter`. A ``timeout`` becomes :class:`~llmbridge.Timeout` (504).
What happens to the call that timed out differs, and is what keeps abandoned calls from
piling up:

* **process**: the worker process is killed, its limiter slot freed at once;
* **thread**: a thread can't be killed, so it runs on, *still holding its limiter
  token*, until the function returns. A pool of ``N`` threads therefore never has more
  than ``N`` calls running, abandoned or not; new calls wait for a token (and time out
  waiting if the pool stays stuck).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import math
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, Literal, ParamSpec, TypeVar

import anyio
import anyio.abc
import anyio.to_process
import anyio.to_thread
from anyio.lowlevel import RunVar

from .._exceptions import Timeout
from . import loop as _portal
from .loop import spawn

__all__ = [
    "DEFAULT",
    "Offloaded",
    "Offloader",
    "ProcessOffloaded",
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


def _name(fn: Callable[..., Any]) -> str:
    # Name the user's function, not the wrappers this module puts around it.
    while isinstance(fn, functools.partial):
        inner = fn.func
        if fn.args and (
            inner is _call_original
            or isinstance(getattr(inner, "__self__", None), contextvars.Context)
        ):
            fn = fn.args[0]
        else:
            fn = inner
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 or None, got {timeout!r}")


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


# -- a long-lived anyio host on the background loop -------------------------------------
#
# anyio ties its worker threads and worker processes to the "root task" of the calling
# task tree: they are stopped (processes killed) when that task ends. On the background
# loop every call is a short-lived task of its own, so without a host each call would
# start a new thread or process, and the end of one call would kill the processes other
# calls still use. Calls made there are therefore run as children of one task that
# lives as long as the loop.

_in_host: contextvars.ContextVar[bool] = contextvars.ContextVar("llmbridge_in_host", default=False)


class _Host:
    """A task group hosted by a task that never ends, on one event loop."""

    def __init__(self) -> None:
        self._group: anyio.abc.TaskGroup | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._main())

    async def _main(self) -> None:
        async with anyio.create_task_group() as group:
            self._group = group
            self._ready.set_result(None)
            await anyio.sleep_forever()

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        await asyncio.shield(self._ready)
        assert self._group is not None
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        scope = anyio.CancelScope()

        async def child() -> None:
            _in_host.set(True)
            with scope:
                try:
                    result = await fn(*args)
                except BaseException as exc:  # handed to the caller, never to the group
                    if not done.done():
                        done.set_exception(exc)
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                else:
                    if not done.done():
                        done.set_result(result)
            if not done.done():
                done.cancel()

        self._group.start_soon(child)
        try:
            return await done
        except asyncio.CancelledError:
            scope.cancel()
            raise


_hosts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Host] = weakref.WeakKeyDictionary()


async def _hosted(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    if _in_host.get() or not _is_background_loop(loop):
        return await fn(*args)
    host = _hosts.get(loop)
    if host is None:
        host = _hosts[loop] = _Host()
    return await host.run(fn, *args)


def _is_background_loop(loop: asyncio.AbstractEventLoop) -> bool:
    portal = _portal._portal
    return portal is not None and portal.loop is loop


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
    """
    _check_timeout(timeout)
    return await _hosted(_run_in_thread, fn, args, kwargs, timeout, limiter)


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


async def run_in_process(
    fn: Callable[..., T],
    /,
    *args: Any,
    timeout: float | None = None,
    limiter: anyio.CapacityLimiter | None = None,
    **kwargs: Any,
) -> T:
    """Call ``fn(*args, **kwargs)`` in a worker process and wait for it without blocking.

    ``fn``, its arguments and its result must pickle (a module-level function, or a
    :class:`ProcessOffloaded`). A function that never releases the GIL blocks only its
    worker process. At most ``limiter.total_tokens`` processes run at once (default:
    anyio's default process limiter, one per CPU); idle workers are reused. ``timeout``
    (seconds, including the wait for a worker) raises :class:`~llmbridge.Timeout` and
    kills the worker that was running the call, as does cancelling the awaiting task, so
    nothing keeps running for a caller that left. ``fn``'s own exceptions propagate.
    """
    _check_timeout(timeout)
    return await _hosted(_run_in_process, fn, args, kwargs, timeout, limiter)


async def _run_in_process(
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
    limiter: anyio.CapacityLimiter | None,
) -> T:
    call: Callable[[], T] = functools.partial(fn, *args, **kwargs)
    try:
        with anyio.fail_after(timeout):
            return await anyio.to_process.run_sync(call, cancellable=True, limiter=limiter)
    except TimeoutError:
        raise Timeout(f"{_name(fn)} did not finish within {timeout} s") from None


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


def _call_original(wrapper: ProcessOffloaded[..., Any], args: Any, kwargs: Any) -> Any:
    # Runs in the worker process, on the wrapper that importing its module created there.
    return wrapper.__wrapped__(*args, **kwargs)


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
    (default: one per CPU) run calls at once; ``timeout`` is the default per call
    (``None``: wait as long as it takes).

    The blocking methods (:meth:`call_in_thread`, :meth:`call_in_process` and the
    wrappers :meth:`thread` / :meth:`process` make) run the call through the process's
    background loop and block the calling thread until it is done; on an event loop,
    await :meth:`arun_in_thread` / :meth:`arun_in_process` instead. Thread-safe;
    fork-safe (a forked child starts with fresh pools).
    """

    def __init__(
        self,
        *,
        max_threads: int = 40,
        max_processes: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self._limiters: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]
        ] = weakref.WeakKeyDictionary()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.configure(max_threads=max_threads, max_processes=max_processes, timeout=timeout)

    def configure(
        self,
        *,
        max_threads: int = 40,
        max_processes: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Set the pool sizes and default timeout. Pools already used on a running loop
        keep their size; new loops (and forked children) get the new one."""
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

    def _limiters_here(self) -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]:
        # A limiter belongs to one event loop (and so to one process: after a fork the
        # child starts over).
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._limiters = weakref.WeakKeyDictionary()
            pair = self._limiters.get(loop)
            if pair is None:
                pair = (
                    anyio.CapacityLimiter(self.max_threads),
                    anyio.CapacityLimiter(self.max_processes),
                )
                self._limiters[loop] = pair
        return pair

    def _resolve(self, timeout: TimeoutArg) -> float | None:
        return self.timeout if timeout is DEFAULT else timeout

    # -- async: on the caller's running loop ------------------------------------------

    async def arun_in_thread(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """:func:`run_in_thread` on this offloader's thread pool, with its default timeout."""
        threads, _ = self._limiters_here()
        return await run_in_thread(
            fn, *args, timeout=self._resolve(timeout), limiter=threads, **kwargs
        )

    async def arun_in_process(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """:func:`run_in_process` on this offloader's process pool, with its default
        timeout."""
        _, processes = self._limiters_here()
        return await run_in_process(
            fn, *args, timeout=self._resolve(timeout), limiter=processes, **kwargs
        )

    # -- blocking: from a thread, through the background loop -------------------------

    def call_in_thread(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """Run ``fn(*args, **kwargs)`` in a pool thread; block until it is done.

        ``fn`` runs in a copy of the calling thread's :mod:`contextvars` context, so it
        sees Flask's request and app context. Raises what ``fn`` raises, or
        :class:`~llmbridge.Timeout` (the thread runs on, holding its pool slot).
        """
        _refuse_on_loop("call_in_thread", "arun_in_thread")
        context = contextvars.copy_context()
        in_context = functools.partial(context.run, fn)

        async def job() -> T:
            return await self.arun_in_thread(in_context, *args, timeout=timeout, **kwargs)

        return spawn(job()).result()

    def call_in_process(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """Run ``fn(*args, **kwargs)`` in a pool process; block until it is done.

        Raises what ``fn`` raises, or :class:`~llmbridge.Timeout` (the worker process is
        killed).
        """
        _refuse_on_loop("call_in_process", "arun_in_process")

        async def job() -> T:
            return await self.arun_in_process(fn, *args, timeout=timeout, **kwargs)

        return spawn(job()).result()

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
