"""The :class:`Stream` handle: how a caller reads one request's channel.

Sync and async iteration, results, cancellation; the channel underneath lives in
:mod:`llmbridge._core.channel`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

from .._exceptions import Timeout
from .channel import Channel, Completion, Request, Wakeups
from .closing import Closing

__all__ = ["Channel", "Completion", "Request", "Stream", "Wakeups"]


class Stream(Closing):
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
        """The request's id: unique among its engine's live requests, and the id of the
        backend job and of the engine's log lines."""
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

        It reads the text as it comes (so a producer bounded by ``max_unread`` never
        waits on it); its ``text`` is everything no earlier read took.

        Raises the request's error (:class:`Cancelled`, :class:`BackendError`, ...) or
        :class:`Timeout` after ``timeout`` seconds, which also cancels the request.
        Don't call it on an event loop: use :meth:`aresult`.
        """
        completion = self._channel.read_all(timeout)
        if completion is None:
            self._channel.cancel(f"no result within {timeout} s")
            raise Timeout(f"no result within {timeout} s")
        return completion

    async def aresult(self, timeout: float | None = None) -> Completion:
        """Wait for the request to end and return its :class:`Completion`.

        The async twin of :meth:`result`: :class:`Timeout` after ``timeout`` seconds,
        which also cancels the request; cancelling the awaiting task cancels it too.
        """
        try:
            async with asyncio.timeout(timeout):
                return await self._channel.aread_all()
        except TimeoutError:
            self._channel.cancel(f"no result within {timeout} s")
            raise Timeout(f"no result within {timeout} s") from None

    def wait_started(self, timeout: float | None = None) -> None:
        """Block until the first text arrives or the request ended.

        Raises the request's error if it failed before producing any text: integrations
        call it to answer 429/503 instead of starting a response they can't finish.
        :class:`Timeout` after ``timeout`` seconds, which also cancels the request.
        """
        try:
            self._channel.wait_started(timeout)
        except Timeout:
            self._channel.cancel(f"no output within {timeout} s")
            raise

    async def await_started(self, timeout: float | None = None) -> None:
        """The async twin of :meth:`wait_started`, with the same ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._channel.await_started()
        except TimeoutError:
            self._channel.cancel(f"no output within {timeout} s")
            raise Timeout(f"no output within {timeout} s") from None

    def cancel(self) -> bool:
        """Cancel the request. Never blocks; idempotent; a no-op once it ended.

        Returns True if this call cancelled a running request.
        """
        return self._channel.cancel()

    def close(self) -> None:
        """Cancel the request if it is still running, releasing its unread text (the
        sync twin of :meth:`aclose`). Never blocks; idempotent."""
        self._channel.cancel("the stream was closed")

    async def aclose(self) -> None:
        """Cancel the request if it is still running, releasing its unread text."""
        self._channel.cancel("the stream was closed")

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
