"""Per-request channels: where one producer's output meets one consumer.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import Cancelled, Timeout

__all__ = ["Channel", "Completion", "Request", "Wakeups"]


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

    # Waiting: a thread sleeps on the channel's condition (notified only when someone
    # waits), a coroutine parks one future that the producer resolves on its loop.

    def _wait_locked(self, deadline: float | None) -> bool:
        """Sleep until notified or ``deadline``; False once the deadline has passed."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        if self._cond is None:
            self._cond = threading.Condition(self._lock)
        self._sync_waiters += 1
        try:
            self._cond.wait(remaining)
        finally:
            self._sync_waiters -= 1
        return True

    def _park_locked(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiter = (loop, future)
        return future

    async def _wake_or_timeout(self, future: asyncio.Future[None], timeout: float | None) -> bool:
        """Await the producer's wake-up; False on ``timeout``. Task cancellation cancels
        the request: the consumer gave up."""
        try:
            if timeout is None:
                await future
                return True
            done, _ = await asyncio.wait((future,), timeout=timeout)
        except asyncio.CancelledError:
            self.cancel("the consuming task was cancelled")
            raise
        if done:
            return True
        with self._lock:
            if self._waiter is not None and self._waiter[1] is future:
                self._waiter = None
        return future.done()

    def _raise_if_failed_before_text_locked(self) -> None:
        if not self._parts and self._state == _FAILED:
            assert self._error is not None
            raise self._error

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
                if not self._wait_locked(deadline):
                    return None

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
                future = self._park_locked()
            if not await self._wake_or_timeout(future, timeout):
                return None

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Block until the channel ends; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._state == _RUNNING:
                if not self._wait_locked(deadline):
                    return False
        return True

    async def await_ended(self) -> None:
        """Wait without blocking the loop until the channel ends."""
        while True:
            with self._lock:
                if self._state != _RUNNING:
                    return
                future = self._park_locked()
            await self._wake_or_timeout(future, None)

    def wait_started(self, timeout: float | None = None) -> None:
        """Block until there is text or the channel ended; raise its error if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._parts and self._state == _RUNNING:
                if not self._wait_locked(deadline):
                    raise Timeout(f"no output within {timeout} s")
            self._raise_if_failed_before_text_locked()

    async def await_started(self) -> None:
        """Wait until there is text or the channel ended; raise its error if it failed."""
        while True:
            with self._lock:
                if self._parts or self._state != _RUNNING:
                    self._raise_if_failed_before_text_locked()
                    return
                future = self._park_locked()
            await self._wake_or_timeout(future, None)

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
