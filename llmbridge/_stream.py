"""Per-request channels and the :class:`Stream` handle that reads them.

A channel is written by exactly one producer at a time (the engine thread, or a worker
thread the engine hands a job to) and read by one consumer: a thread or a coroutine on any
event loop. Text the consumer has not read yet is coalesced into one string on read, so a
slow consumer costs that request's own output and never more. Async consumers are woken
with ``loop.call_soon_threadsafe``; the producer batches those wake-ups per loop and calls
:meth:`Wakeups.flush` once per engine step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ._exceptions import Cancelled, Timeout

__all__ = ["Completion", "Request", "Stream"]


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a backend sees it.

    ``id`` is unique in the process and is the identifier to give a backend job;
    ``params`` holds the sampling parameters passed to :meth:`Engine.submit`.
    """

    id: str
    prompt: str
    params: dict[str, Any] = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Completion:
    """The whole outcome of a finished request.

    Timings are in seconds from submission: ``queued`` until a backend slot took the
    request, ``time_to_first_token`` until the first text arrived (``None`` if none did),
    ``total`` until the end.
    """

    id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queued: float
    time_to_first_token: float | None
    total: float

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


class Wakeups:
    """Async wake-ups gathered during one engine step, sent once per event loop.

    Not thread-safe: each producer thread keeps its own.
    """

    __slots__ = ("_by_loop",)

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        futures = self._by_loop.get(loop)
        if futures is None:
            self._by_loop[loop] = [future]
        else:
            futures.append(future)

    def flush(self) -> None:
        """Wake every gathered consumer: one ``call_soon_threadsafe`` per loop."""
        if not self._by_loop:
            return
        by_loop, self._by_loop = self._by_loop, {}
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, futures)
            except RuntimeError:
                pass  # the consumer's loop is closed: nobody is left to wake


_RUNNING, _FINISHED, _FAILED = 0, 1, 2


class Channel:
    """The producer/consumer meeting point of one request. Thread-safe.

    Producers call :meth:`start`, :meth:`emit`, :meth:`finish` or :meth:`fail`; once the
    channel has ended, later writes are ignored (a backend may still report a job that
    its consumer already cancelled). :meth:`cancel` is the consumer's side: it ends the
    channel at once with :class:`Cancelled` and runs ``on_cancel`` once, which tells the
    producer to stop.
    """

    __slots__ = (
        "_completion_tokens",
        "_cond",
        "_error",
        "_finish_reason",
        "_lock",
        "_on_cancel",
        "_parts",
        "_prompt_tokens",
        "_read",
        "_state",
        "_sync_waiters",
        "_t_end",
        "_t_first",
        "_t_start",
        "_waiter",
        "request",
    )

    def __init__(self, request: Request, on_cancel: Callable[[], None] | None = None) -> None:
        self.request = request
        self._lock = threading.Lock()
        self._cond: threading.Condition | None = None
        self._sync_waiters = 0
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._parts: list[str] = []
        self._read = 0
        self._state = _RUNNING
        self._error: BaseException | None = None
        self._finish_reason = ""
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._t_start: float | None = None
        self._t_first: float | None = None
        self._t_end: float | None = None
        self._on_cancel = on_cancel

    # -- producer side -------------------------------------------------------------

    def set_on_cancel(self, on_cancel: Callable[[], None] | None) -> None:
        """Replace the hook :meth:`cancel` runs (once) to stop the producer."""
        with self._lock:
            if self._state == _RUNNING:
                self._on_cancel = on_cancel
                return
        if on_cancel is not None and isinstance(self._error, Cancelled):
            on_cancel()  # cancelled before the hook was installed: run it now

    def start(self) -> None:
        """Record that a backend slot took the request (ends its queue time)."""
        if self._t_start is None:
            self._t_start = time.monotonic()

    @property
    def ended(self) -> bool:
        """True once the channel finished, failed or was cancelled."""
        return self._state != _RUNNING

    @property
    def started(self) -> bool:
        """True once a backend slot took the request (its queue wait is over)."""
        return self._t_start is not None

    def emit(self, text: str, tokens: int = 1, wakeups: Wakeups | None = None) -> bool:
        """Append ``text`` (worth ``tokens`` tokens). Returns False if the channel ended."""
        if not text and not tokens:
            return self._state == _RUNNING
        with self._lock:
            if self._state != _RUNNING:
                return False
            if self._t_first is None and text:
                self._t_first = time.monotonic()
            if text:
                self._parts.append(text)
            self._completion_tokens += tokens
            self._wake_locked(wakeups)
        return True

    def finish(
        self,
        finish_reason: str = "stop",
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        wakeups: Wakeups | None = None,
    ) -> bool:
        """End the channel successfully. Returns False if it had already ended."""
        with self._lock:
            if self._state != _RUNNING:
                return False
            self._state = _FINISHED
            self._finish_reason = finish_reason
            if prompt_tokens is not None:
                self._prompt_tokens = prompt_tokens
            if completion_tokens is not None:
                self._completion_tokens = completion_tokens
            self._t_end = time.monotonic()
            self._on_cancel = None
            self._wake_locked(wakeups)
        return True

    def fail(self, error: BaseException, wakeups: Wakeups | None = None) -> bool:
        """End the channel with ``error``. Returns False if it had already ended."""
        with self._lock:
            if self._state != _RUNNING:
                return False
            self._state = _FAILED
            self._error = error
            self._finish_reason = "cancelled" if isinstance(error, Cancelled) else "error"
            self._t_end = time.monotonic()
            self._on_cancel = None
            self._wake_locked(wakeups)
        return True

    def _wake_locked(self, wakeups: Wakeups | None) -> None:
        if self._sync_waiters:
            assert self._cond is not None
            self._cond.notify_all()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if wakeups is None:
                try:
                    waiter[0].call_soon_threadsafe(_resolve, [waiter[1]])
                except RuntimeError:
                    pass
            else:
                wakeups.add(*waiter)

    # -- consumer side -------------------------------------------------------------

    def cancel(self, reason: str = "cancelled by the consumer") -> bool:
        """End the channel with :class:`Cancelled` and stop the producer. Idempotent.

        Returns True if this call cancelled a running request.
        """
        with self._lock:
            if self._state != _RUNNING:
                return False
            self._state = _FAILED
            self._error = Cancelled(reason)
            self._finish_reason = "cancelled"
            self._t_end = time.monotonic()
            on_cancel, self._on_cancel = self._on_cancel, None
            self._wake_locked(None)
        if on_cancel is not None:
            on_cancel()
        return True

    def _take_locked(self) -> str | None:
        parts = self._parts
        n = len(parts)
        if self._read == n:
            return None
        text = parts[self._read] if n - self._read == 1 else "".join(parts[self._read :])
        self._read = n
        return text

    def _raise_end_locked(self, stop: type[Exception]) -> None:
        if self._state == _FAILED:
            assert self._error is not None
            raise self._error
        raise stop

    def next_text(self, timeout: float | None = None) -> str | None:
        """Block until there is unread text; return all of it.

        Returns ``None`` if ``timeout`` seconds pass with nothing new (the request goes
        on), raises ``StopIteration`` at a normal end and the request's error otherwise.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                text = self._take_locked()
                if text is not None:
                    return text
                if self._state != _RUNNING:
                    self._raise_end_locked(StopIteration)
                if self._cond is None:
                    self._cond = threading.Condition(self._lock)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._sync_waiters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._sync_waiters -= 1

    async def anext_text(self, timeout: float | None = None) -> str | None:
        """Wait (without blocking the loop) for unread text; return all of it.

        Returns ``None`` if ``timeout`` seconds pass with nothing new (the request goes
        on), raises ``StopAsyncIteration`` at a normal end and the request's error
        otherwise. Cancelling the awaiting task cancels the request.
        """
        while True:
            with self._lock:
                text = self._take_locked()
                if text is not None:
                    return text
                if self._state != _RUNNING:
                    self._raise_end_locked(StopAsyncIteration)
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._waiter = (loop, future)
            try:
                if timeout is None:
                    await future
                else:
                    done, _ = await asyncio.wait((future,), timeout=timeout)
                    if not done:
                        with self._lock:
                            if self._waiter is not None and self._waiter[1] is future:
                                self._waiter = None
                        if not future.done():
                            return None
            except asyncio.CancelledError:
                self.cancel("the consuming task was cancelled")
                raise

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Block until the channel ends; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._state == _RUNNING:
                if self._cond is None:
                    self._cond = threading.Condition(self._lock)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._sync_waiters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._sync_waiters -= 1
        return True

    async def await_ended(self) -> None:
        """Wait without blocking the loop until the channel ends."""
        while True:
            with self._lock:
                if self._state != _RUNNING:
                    return
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._waiter = (loop, future)
            try:
                await future
            except asyncio.CancelledError:
                self.cancel("the consuming task was cancelled")
                raise

    def wait_started(self, timeout: float | None = None) -> None:
        """Block until there is text or the channel ended; raise its error if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._parts and self._state == _RUNNING:
                if self._cond is None:
                    self._cond = threading.Condition(self._lock)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Timeout(f"no output within {timeout} s")
                self._sync_waiters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._sync_waiters -= 1
            if not self._parts and self._state == _FAILED:
                assert self._error is not None
                raise self._error

    async def await_started(self) -> None:
        """Wait until there is text or the channel ended; raise its error if it failed."""
        while True:
            with self._lock:
                if self._parts or self._state != _RUNNING:
                    if not self._parts and self._state == _FAILED:
                        assert self._error is not None
                        raise self._error
                    return
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._waiter = (loop, future)
            try:
                await future
            except asyncio.CancelledError:
                self.cancel("the consuming task was cancelled")
                raise

    def completion(self) -> Completion:
        """The :class:`Completion` of an ended channel; raises its error if it failed."""
        with self._lock:
            if self._state == _RUNNING:
                raise RuntimeError("the request has not ended yet")
            if self._state == _FAILED:
                assert self._error is not None
                raise self._error
            return self._completion_locked()

    def _completion_locked(self) -> Completion:
        submitted = self.request.submitted_at
        end = self._t_end if self._t_end is not None else time.monotonic()
        start = self._t_start if self._t_start is not None else end
        return Completion(
            id=self.request.id,
            text="".join(self._parts),
            finish_reason=self._finish_reason,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            queued=max(0.0, start - submitted),
            time_to_first_token=None if self._t_first is None else self._t_first - submitted,
            total=end - submitted,
        )

    def snapshot(self) -> tuple[str, bool]:
        """All text so far and whether the channel ended (for replay to late joiners)."""
        with self._lock:
            return "".join(self._parts), self._state != _RUNNING

    @property
    def error(self) -> BaseException | None:
        """The error the channel failed with, if it did."""
        return self._error


class Stream:
    """The handle to one submitted request's output.

    Iterate it (``for`` in a thread, ``async for`` in a coroutine on any event loop) to
    receive ``str`` chunks as they are produced, or call :meth:`result` / :meth:`aresult`
    for the whole :class:`Completion`. Chunks are coalesced: a slow reader gets everything
    produced since its last read in one chunk.

    A stream may be handed between threads and tasks, but read by one consumer at a
    time. Giving up on it cancels the backend job within one engine step: breaking out of
    the loop, closing the iterator, cancelling the reading task, :meth:`cancel`, leaving a
    ``with`` block early, or dropping the last reference to an unfinished stream.

    >>> with Engine(lambda prompt: prompt.upper()) as engine:  # doctest: +SKIP
    ...     print(engine.submit("hello").result().text)
    HELLO
    """

    __slots__ = ("__weakref__", "_channel")

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def __repr__(self) -> str:
        state = "running" if not self._channel.ended else "ended"
        return f"<Stream id={self.id!r} {state}>"

    @property
    def id(self) -> str:
        """The request's id, unique in the process."""
        return self._channel.request.id

    @property
    def request(self) -> Request:
        """The :class:`Request` this stream carries the output of."""
        return self._channel.request

    @property
    def done(self) -> bool:
        """True once the request finished, failed or was cancelled. Never blocks."""
        return self._channel.ended

    @property
    def channel(self) -> Channel:
        """The underlying channel (for integrations and policies)."""
        return self._channel

    def __iter__(self) -> Iterator[str]:
        return _SyncReader(self)

    def __aiter__(self) -> AsyncIterator[str]:
        return _AsyncReader(self)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends and return its :class:`Completion`.

        Raises the request's error (:class:`Cancelled`, :class:`BackendError`, ...) or
        :class:`Timeout` after ``timeout`` seconds, which also cancels the request.
        Don't call it on an event loop: use :meth:`aresult`.
        """
        if not self._channel.wait_ended(timeout):
            self._channel.cancel(f"no result within {timeout} s")
            raise Timeout(f"no result within {timeout} s")
        return self._channel.completion()

    async def aresult(self) -> Completion:
        """Wait for the request to end and return its :class:`Completion`.

        The async twin of :meth:`result`; cancelling the awaiting task cancels the request.
        """
        await self._channel.await_ended()
        return self._channel.completion()

    def wait_started(self, timeout: float | None = None) -> None:
        """Block until the first text arrives or the request ended.

        Raises the request's error if it failed before producing any text: integrations
        call it to answer 429/503 instead of starting a response they can't finish.
        """
        self._channel.wait_started(timeout)

    async def await_started(self) -> None:
        """The async twin of :meth:`wait_started`."""
        await self._channel.await_started()

    def cancel(self) -> bool:
        """Cancel the request. Never blocks; idempotent; a no-op once it ended.

        Returns True if this call cancelled a running request.
        """
        return self._channel.cancel()

    def close(self) -> None:
        """Cancel the request if it is still running (the sync twin of :meth:`aclose`)."""
        self._channel.cancel("the stream was closed")

    async def aclose(self) -> None:
        """Cancel the request if it is still running."""
        self._channel.cancel("the stream was closed")

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropping an unfinished stream means nobody will read it: free the backend slot.
        channel = getattr(self, "_channel", None)
        if channel is not None and not channel.ended:
            try:
                channel.cancel("the stream was dropped unread")
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


class _SyncReader(Iterator[str]):
    """``for chunk in stream``: stops cleanly at the end, cancels if abandoned early."""

    # Holding the stream keeps `for chunk in engine.submit(...)` alive: the temporary
    # Stream would otherwise be dropped (and cancelled) as soon as iteration began.
    __slots__ = ("_channel", "_exhausted", "_stream")

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._channel = stream.channel
        self._exhausted = False

    def __iter__(self) -> _SyncReader:
        return self

    def __next__(self) -> str:
        try:
            text = self._channel.next_text()
        except BaseException:
            self._exhausted = True
            raise
        assert text is not None  # no timeout: only text or the end
        return text

    def close(self) -> None:
        """Stop reading: cancels the request if it is still running."""
        self._exhausted = True
        self._channel.cancel("the iterator was closed")

    def __del__(self) -> None:
        if not self._exhausted:
            self._channel.cancel("the iterator was abandoned")


class _AsyncReader(AsyncIterator[str]):
    """``async for chunk in stream``: the async twin of :class:`_SyncReader`."""

    # Holding the stream keeps `for chunk in engine.submit(...)` alive: the temporary
    # Stream would otherwise be dropped (and cancelled) as soon as iteration began.
    __slots__ = ("_channel", "_exhausted", "_stream")

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._channel = stream.channel
        self._exhausted = False

    def __aiter__(self) -> _AsyncReader:
        return self

    async def __anext__(self) -> str:
        try:
            text = await self._channel.anext_text()
        except BaseException:
            self._exhausted = True
            raise
        assert text is not None  # no timeout: only text or the end
        return text

    async def aclose(self) -> None:
        """Stop reading: cancels the request if it is still running."""
        self._exhausted = True
        self._channel.cancel("the iterator was closed")

    def __del__(self) -> None:
        if not self._exhausted:
            self._channel.cancel("the iterator was abandoned")
