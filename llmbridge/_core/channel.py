"""Per-request channels: where one producer's output meets one consumer.

A channel is written by exactly one producer at a time (the engine thread, or a worker
thread the engine hands a job to) and read by one consumer: a thread or a coroutine on any
event loop. A channel holds only the text its consumer has not read yet, coalesced into
one string on read and forgotten once read; ``max_unread`` bounds it (:attr:`Channel.full`
tells the producer to wait: :meth:`Channel.wait_space`, :meth:`Channel.await_space`, or a
one-shot :meth:`Channel.set_on_space` hook). Async consumers are woken with
``loop.call_soon_threadsafe``; the producer batches those wake-ups per loop and calls
:meth:`Wakeups.flush` once per engine step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from .._exceptions import Cancelled, Timeout
from .request import Completion, Request, RequestOutcome
from .wakeups import Wakeups, resolve

__all__ = ["Channel", "Completion", "Request", "RequestOutcome", "Wakeups"]


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
        "_on_end",
        "_on_space",
        "_outcome",
        "_parts",
        "_prompt_tokens",
        "_space_waiter",
        "_state",
        "_sync_waiters",
        "_t_end",
        "_t_first",
        "_t_start",
        "_unread",
        "_waiter",
        "max_unread",
        "notes",
        "request",
    )

    def __init__(
        self,
        request: Request,
        on_cancel: Callable[[], None] | None = None,
        *,
        max_unread: int | None = None,
    ) -> None:
        self.request = request
        #: Characters of unread text past which :attr:`full` is true (``None``: no bound).
        self.max_unread = max_unread
        self._lock = threading.Lock()
        self._cond: threading.Condition | None = None
        self._sync_waiters = 0
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._space_waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._on_space: Callable[[], None] | None = None
        self._on_end: Callable[[], None] | None = None
        # Only text the consumer has not read yet: a read hands it over and forgets it.
        self._parts: list[str] = []
        self._unread = 0
        self._state = _RUNNING
        self._error: BaseException | None = None
        self._finish_reason = ""
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._t_start: float | None = None
        self._t_first: float | None = None
        self._t_end: float | None = None
        self._on_cancel = on_cancel
        self._outcome: RequestOutcome | None = None
        #: What the policies did with the request (``"cache_hit"``, ``"coalesced"``),
        #: for metrics and the log line; ``None`` until the first :meth:`note`.
        self.notes: list[str] | None = None

    def note(self, what: str) -> None:
        """Record that a policy did ``what`` with this request. Never blocks."""
        if self.notes is None:
            self.notes = [what]
        else:
            self.notes.append(what)

    def outcome(self) -> RequestOutcome:
        """How the request went so far (:class:`RequestOutcome`), ended or not, failed or not.
        Never blocks for long (the channel's lock); any thread."""
        if self._outcome is not None:
            return self._outcome  # an ended channel's never changes: built once
        with self._lock:
            submitted = self.request.submitted_at
            end = self._t_end if self._t_end is not None else time.monotonic()
            outcome = RequestOutcome(
                id=self.request.id,
                finish_reason=self._finish_reason if self._state != _RUNNING else "",
                error=self._error,
                prompt_tokens=self._prompt_tokens,
                completion_tokens=self._completion_tokens,
                queued=None if self._t_start is None else max(0.0, self._t_start - submitted),
                time_to_first_token=None if self._t_first is None else self._t_first - submitted,
                total=end - submitted,
                notes=tuple(self.notes) if self.notes else (),
            )
            if self._state != _RUNNING:
                self._outcome = outcome
            return outcome

    # -- producer side -------------------------------------------------------------

    def set_on_cancel(self, on_cancel: Callable[[], None] | None) -> None:
        """Replace the hook :meth:`cancel` runs (once) to stop the producer."""
        with self._lock:
            if self._state == _RUNNING:
                self._on_cancel = on_cancel
                return
        if on_cancel is not None and isinstance(self._error, Cancelled):
            on_cancel()  # cancelled before the hook was installed: run it now

    def set_on_end(self, on_end: Callable[[], None] | None) -> None:
        """Run ``on_end`` once when the channel ends (finished, failed or cancelled), on
        the thread that ended it, outside the channel's lock. Runs at once if it ended."""
        with self._lock:
            if self._state == _RUNNING:
                self._on_end = on_end
                return
        if on_end is not None:
            on_end()

    def set_on_space(self, on_space: Callable[[], None] | None) -> None:
        """Run ``on_space`` once, on the consumer's thread, when a read makes room in a
        :attr:`full` channel (or at once if it has room or ended): how a paused producer
        learns it may go on. Must not block."""
        with self._lock:
            if self._state == _RUNNING and self._full_locked():
                self._on_space = on_space
                return
        if on_space is not None:
            on_space()

    @property
    def full(self) -> bool:
        """True while ``max_unread`` characters or more wait for the consumer."""
        bound = self.max_unread
        return bound is not None and self._unread >= bound

    def _full_locked(self) -> bool:
        return self.max_unread is not None and self._unread >= self.max_unread

    @property
    def has_text(self) -> bool:
        """True once some text was written (read or not)."""
        return self._t_first is not None

    @property
    def first_text_at(self) -> float | None:
        """The monotonic time the first text was written, else ``None``."""
        return self._t_first

    @property
    def completion_tokens(self) -> int:
        """Tokens written so far."""
        return self._completion_tokens

    def wait_space(self, timeout: float | None = None) -> bool:
        """Block the producer's thread while the channel is :attr:`full`; False if
        ``timeout`` passed first. Returns at once once the channel ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._state == _RUNNING and self._full_locked():
                if not self._wait_locked(deadline):
                    return False
        return True

    async def await_space(self) -> None:
        """Wait without blocking the loop while the channel is :attr:`full` (the
        producer's side of the bound). Returns once the channel ended."""
        while True:
            with self._lock:
                if self._state != _RUNNING or not self._full_locked():
                    return
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._space_waiter = (loop, future)
            await future

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
                self._unread += len(text)
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
            on_end = self._ended_locked(wakeups)
        if on_end is not None:
            on_end()
        return True

    def fail(self, error: BaseException, wakeups: Wakeups | None = None) -> bool:
        """End the channel with ``error``. Returns False if it had already ended."""
        with self._lock:
            if self._state != _RUNNING:
                return False
            self._state = _FAILED
            self._error = error
            self._finish_reason = "cancelled" if isinstance(error, Cancelled) else "error"
            on_end = self._ended_locked(wakeups)
        if on_end is not None:
            on_end()
        return True

    def _ended_locked(self, wakeups: Wakeups | None) -> Callable[[], None] | None:
        """What every end does under the lock, once the state is set: stamp the time,
        wake both sides, and hand back the ``on_end`` hook to run outside the lock."""
        self._t_end = time.monotonic()
        self._on_cancel = None
        self._wake_locked(wakeups)
        self._wake_producer_locked()
        on_end, self._on_end = self._on_end, None
        return on_end

    def _wake_locked(self, wakeups: Wakeups | None) -> None:
        if self._sync_waiters:
            assert self._cond is not None
            self._cond.notify_all()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if wakeups is None:
                try:
                    waiter[0].call_soon_threadsafe(resolve, [waiter[1]])
                except RuntimeError:
                    pass
            else:
                wakeups.add(*waiter)

    def _wake_producer_locked(self) -> None:
        """Tell a producer waiting for room that there is some (or the channel ended)."""
        space_waiter = self._space_waiter
        if space_waiter is not None:
            self._space_waiter = None
            try:
                space_waiter[0].call_soon_threadsafe(resolve, [space_waiter[1]])
            except RuntimeError:
                pass
        on_space = self._on_space
        if on_space is not None:
            # Called under the lock: it only wakes the engine (an event or a loop's
            # self-pipe) and never takes a channel lock.
            self._on_space = None
            on_space()

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
            self._parts = []  # nobody will read it: release it now
            self._unread = 0
            self._wake_locked(None)
            self._wake_producer_locked()
            on_end, self._on_end = self._on_end, None
        if on_cancel is not None:
            on_cancel()
        if on_end is not None:
            on_end()
        return True

    def _take_locked(self) -> str | None:
        parts = self._parts
        if not parts:
            return None
        text = parts[0] if len(parts) == 1 else "".join(parts)
        self._parts = []
        full = self._full_locked()
        self._unread = 0
        if full:
            self._wake_producer_locked()
            if self._sync_waiters:
                assert self._cond is not None
                self._cond.notify_all()  # a producer thread may wait for room
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
        if self._t_first is None and self._state == _FAILED:
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
            while self._t_first is None and self._state == _RUNNING:
                if not self._wait_locked(deadline):
                    raise Timeout(f"no output within {timeout} s")
            self._raise_if_failed_before_text_locked()

    async def await_started(self) -> None:
        """Wait until there is text or the channel ended; raise its error if it failed."""
        while True:
            with self._lock:
                if self._t_first is not None or self._state != _RUNNING:
                    self._raise_if_failed_before_text_locked()
                    return
                future = self._park_locked()
            await self._wake_or_timeout(future, None)

    def read_all(self, timeout: float | None = None) -> Completion | None:
        """Block until the channel ends, reading as the text comes (so a bounded producer
        never waits on us); return the :class:`Completion` with all of it. ``None`` if
        ``timeout`` passed first; raises the request's error if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: list[str] = []
        with self._lock:
            while True:
                text = self._take_locked()
                if text is not None:
                    chunks.append(text)
                if self._state != _RUNNING:
                    break
                if not self._wait_locked(deadline):
                    return None
            return self._ended_completion_locked(chunks)

    async def aread_all(self) -> Completion:
        """The async twin of :meth:`read_all`, without a timeout (wrap it in one)."""
        chunks: list[str] = []
        while True:
            with self._lock:
                text = self._take_locked()
                if text is not None:
                    chunks.append(text)
                if self._state != _RUNNING:
                    return self._ended_completion_locked(chunks)
                future = self._park_locked()
            await self._wake_or_timeout(future, None)

    def _ended_completion_locked(self, chunks: list[str]) -> Completion:
        if self._state == _FAILED:
            assert self._error is not None
            raise self._error
        if chunks:
            # The caller asked for all of it: keep it, so a second result() (or a late
            # iteration) sees the same text, as before the reads.
            self._parts = ["".join(chunks), *self._parts]
        return self._completion_locked()

    def completion(self) -> Completion:
        """The :class:`Completion` of an ended channel; raises its error if it failed.

        Its ``text`` is what no read has taken yet: all of it if nobody read the stream.
        """
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
