"""Bounded worker-process pools that real native clients can run in.

A call offloaded to a process must survive what native clients do there: write to
file descriptors 1 and 2 from C or Rust (BAML's runtime logs that way), raise an
exception whose ``__init__`` can't be called again from its ``args``, or return a class
defined in the main script. anyio's ``to_process`` can't carry these: its workers
speak their protocol over the worker's stdin/stdout, so a native ``write(1, ...)``
corrupts the reply stream (``BrokenWorkerProcess``); it pickles results with the plain
pickler; and it re-runs the main script by path (``python -m flask run`` breaks).

So the pools here are pebble's ``ProcessPool``: workers are ``multiprocessing`` spawn
children that talk over a pipe of their own (fds 1 and 2 stay the server's, so what
the offloaded code prints reaches the server's log), it kills the one worker whose
call was cancelled or timed out and starts a replacement while the other workers go
on, and it is bounded (``max_workers`` processes, calls beyond that queue). On top,
this module pickles the call and its outcome itself, so nothing pebble carries can
fail to unpickle:

* an exception that pickles comes back as itself (``except ApiError`` matches); one
  whose class can't be rebuilt from ``args`` is rebuilt without calling ``__init__``
  (args and attributes restored); one that can't cross at all becomes a
  :class:`RemoteError` carrying its type name, message and remote traceback. Either
  way the remote traceback is the exception's ``__cause__``;
* classes and functions of the main script (``__mp_main__`` in a worker) come back as
  the parent's ``__main__`` ones;
* a worker that dies, a pool that breaks, a result that can't be pickled raise
  :class:`OffloadError` (500, its text never shown to an HTTP client).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import io
import multiprocessing
import multiprocessing.process
import os
import pickle
import sys
import threading
import traceback
import types
from typing import Any, Final, TypeVar

import anyio

from .._exceptions import OffloadError, RemoteError, Timeout
from .fork import on_fork_in_child

__all__ = [
    "OffloadError",
    "ProcessPool",
    "RemoteError",
    "RemoteTraceback",
    "run_in_process",
]

T = TypeVar("T")


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception that came back from a worker process: its
    ``str()`` is the traceback formatted in the worker."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


# -- crossing the process boundary ------------------------------------------------------


def _main_global(qualname: str) -> Any:
    obj: Any = sys.modules["__main__"]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _Pickler(pickle.Pickler):
    # A spawned worker runs the main script as module ``__mp_main__`` (and aliases
    # ``__main__`` to it), so its classes and functions pickle under a name the
    # parent doesn't have. Send them as "the __main__ global of this name".
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type | types.FunctionType) and obj.__module__ == "__mp_main__":
            return _main_global, (obj.__qualname__,)
        return NotImplemented


def _dumps(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _rebuild_exception(cls: type[BaseException], args: tuple[Any, ...], state: Any) -> Any:
    # Like unpickling, minus the ``cls(*args)`` call that a custom __init__ refuses.
    error = cls.__new__(cls, *args)
    error.args = args
    if state:
        error.__dict__.update(state)
    return error


def _encode_error(error: BaseException) -> bytes | None:
    """The exception pickled so that it unpickles as itself, or None."""
    try:
        blob = _dumps(error)
        pickle.loads(blob)  # the classic failure: __init__ wants other arguments
        return blob
    except Exception:
        pass
    cls = type(error)
    for state in (getattr(error, "__dict__", None), None):
        try:
            blob = _dumps((_rebuild_exception, cls, error.args, state))
            rebuild, *parts = pickle.loads(blob)
            rebuild(*parts)
            return blob
        except Exception:
            continue
    return None


def _decode_error(blob: bytes) -> BaseException | None:
    try:
        value = pickle.loads(blob)
        if isinstance(value, tuple) and value and value[0] is _rebuild_exception:
            value = _rebuild_exception(*value[1:])
    except Exception:
        return None
    return value if isinstance(value, BaseException) else None


# An outcome is plain data (str, bytes, None), so pebble can always carry it:
# ("ok", pickled result) or ("error", pickled exception or None, type name, message,
# traceback).
_Outcome = tuple[Any, ...]


def _type_name(error: BaseException) -> str:
    cls = type(error)
    module = "__main__" if cls.__module__ == "__mp_main__" else cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _failure(error: BaseException) -> _Outcome:
    try:
        message = str(error)
    except Exception:
        message = "<unprintable exception>"
    text = "".join(traceback.format_exception(error))
    return ("error", _encode_error(error), _type_name(error), message, text)


def _execute(payload: bytes) -> _Outcome:
    """In the worker process: run the pickled call, return its outcome as plain data."""
    try:
        fn, args, kwargs = pickle.loads(payload)
        value = fn(*args, **kwargs)
    except BaseException as error:
        return _failure(error)
    try:
        return ("ok", _dumps(value))
    except Exception as error:
        return _failure(OffloadError(f"the result of {_name(fn)} can't be pickled: {error}"))


def _result(outcome: _Outcome, name: str) -> Any:
    if outcome[0] == "ok":
        try:
            return pickle.loads(outcome[1])
        except Exception as error:
            raise OffloadError(f"the result of {name} can't be unpickled here") from error
    _, blob, type_name, message, text = outcome
    remote = _decode_error(blob) if blob is not None else None
    if remote is None:
        remote = RemoteError(type_name, message, text)
    raise remote from RemoteTraceback(text)


# -- naming and checks shared with the thread pools -------------------------------------


def _call_original(wrapper: Any, args: Any, kwargs: Any) -> Any:
    # Runs in the worker process, on the wrapper that importing its module created there
    # (a ProcessOffloaded pickles by name; calling it there would offload again).
    return wrapper.__wrapped__(*args, **kwargs)


def _name(fn: Any) -> str:
    # Name the user's function, not the wrappers this package puts around it.
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


# -- the pool ----------------------------------------------------------------------------

_SPAWN: Final = "spawn"


class ProcessPool:
    """At most ``max_workers`` worker processes for blocking or GIL-holding calls.

    Workers start (``multiprocessing`` spawn) on the first call and are reused. A call
    that times out or whose caller is cancelled has its worker killed (SIGTERM, then
    SIGKILL after 3 s if the call holds the GIL) and replaced; calls in other workers go
    on. ``fn``, its arguments and its result must pickle (module-level functions;
    classes of the main script are fine).

    :meth:`call` blocks the calling thread (never use it on an event loop);
    :meth:`acall` is its async twin, for asyncio. Thread-safe; fork-safe (a forked child
    starts its own workers on first use).
    """

    def __init__(self, max_workers: int) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
        self.max_workers = max_workers
        self._lock = threading.Lock()
        self._pool: Any = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<ProcessPool max_workers={self.max_workers}>"

    def _pebble(self) -> Any:
        pebble = _import_pebble()
        with self._lock:
            if self._pid != os.getpid():
                # Forked: the parent's workers and pebble's threads aren't ours.
                self._pid, self._pool = os.getpid(), None
            if self._pool is None or not self._pool.active:
                self._pool = pebble.ProcessPool(
                    max_workers=self.max_workers, context=multiprocessing.get_context(_SPAWN)
                )
            return self._pool

    def _submit(self, fn: Any, args: Any, kwargs: Any) -> concurrent.futures.Future[_Outcome]:
        try:
            payload = _dumps((fn, args, kwargs))
        except Exception as error:
            raise OffloadError(f"the call to {_name(fn)} can't be pickled: {error}") from error
        try:
            future: concurrent.futures.Future[_Outcome] = self._pebble().schedule(
                _execute, args=(payload,)
            )
        except RuntimeError:  # the pool broke between the check and the call
            future = self._pebble().schedule(_execute, args=(payload,))
        return future

    def call(self, fn: Any, /, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a worker process; block until it is done.

        ``timeout`` (seconds, including the wait for a free worker) raises
        :class:`~llmbridge.Timeout` and kills the worker. Raises what ``fn`` raises (see
        the module docstring), or :class:`OffloadError`.
        """
        _check_timeout(timeout)
        future = self._submit(fn, args, kwargs)
        try:
            outcome = future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise Timeout(f"{_name(fn)} did not finish within {timeout} s") from None
        except Exception as error:
            raise _pool_failure(fn, error) from error
        finally:
            if not future.done():
                future.cancel()  # pebble kills the worker that runs it
        return _result(outcome, _name(fn))

    async def acall(
        self, fn: Any, /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """The async twin of :meth:`call`: awaits the worker without blocking the loop.
        Cancelling the awaiting task kills the worker, as a timeout does."""
        _check_timeout(timeout)
        future = self._submit(fn, args, kwargs)
        try:
            with anyio.fail_after(timeout):
                outcome = await asyncio.wrap_future(future)
        except TimeoutError:
            raise Timeout(f"{_name(fn)} did not finish within {timeout} s") from None
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            raise
        except Exception as error:
            raise _pool_failure(fn, error) from error
        finally:
            if not future.done():
                future.cancel()
        return _result(outcome, _name(fn))

    def close(self) -> None:
        """Stop the workers (killing running calls) and wait for them. Idempotent; the
        next call starts new workers."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.stop()
            pool.join()


def _pool_failure(fn: Any, error: BaseException) -> OffloadError:
    pebble = _import_pebble()
    if isinstance(error, pebble.ProcessExpired):
        return OffloadError(
            f"the worker process running {_name(fn)} died (exit code {error.exitcode})"
        )
    return OffloadError(f"the process pool failed running {_name(fn)}: {error!r}")


def _import_pebble() -> Any:
    try:
        import pebble
    except ImportError:  # pragma: no cover - a dependency of llmbridge
        raise ImportError('to_process needs pebble: pip install "llmbridge"') from None
    return pebble


_default_lock = threading.Lock()
_default: ProcessPool | None = None


def default_process_pool() -> ProcessPool:
    """The process-wide pool :func:`run_in_process` uses: one worker per CPU."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ProcessPool(os.cpu_count() or 2)
        return _default


@on_fork_in_child
def _reset_in_child() -> None:
    global _default, _default_lock
    _default_lock = threading.Lock()
    _default = None
    # The parent's worker processes are listed as children here too; at exit, pebble
    # and multiprocessing would signal them and wait for them. multiprocessing's own
    # forked children start with an empty list the same way.
    multiprocessing.process._children.clear()  # type: ignore[attr-defined]


async def run_in_process(
    fn: Any,
    /,
    *args: Any,
    timeout: float | None = None,
    limiter: anyio.CapacityLimiter | None = None,
    **kwargs: Any,
) -> Any:
    """Call ``fn(*args, **kwargs)`` in a worker process and wait for it without blocking.

    Runs on :func:`default_process_pool` (one worker per CPU); ``limiter`` optionally
    bounds these calls further (a token is held for the whole call). ``timeout``
    (seconds, including the waits for a token and a worker) raises
    :class:`~llmbridge.Timeout` and kills the worker, as does cancelling the awaiting
    task. Raises what ``fn`` raises, or :class:`OffloadError`.
    """
    _check_timeout(timeout)
    pool = default_process_pool()
    if limiter is None:
        return await pool.acall(fn, *args, timeout=timeout, **kwargs)
    try:
        with anyio.fail_after(timeout):
            async with limiter:
                return await pool.acall(fn, *args, **kwargs)
    except TimeoutError:
        raise Timeout(f"{_name(fn)} did not finish within {timeout} s") from None
