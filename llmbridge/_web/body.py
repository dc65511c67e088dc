"""Response bodies over a :class:`~llmbridge.Stream`, shared by every integration.

:class:`StreamBody` is the one stream → bytes loop: Flask's and Quart's bridges and the
OpenAI routes all answer with one, and a :class:`~llmbridge._sansio.framing.Framer`
decides what its bytes look like (SSE events, plain text, OpenAI chunks). It reads as a
sync iterable (a WSGI server's thread) and as an async one (an ASGI server's loop).
Closing it (a WSGI ``close()``, a client disconnect) cancels the request.

A :class:`WholeBody` is the other kind of answer a view can hand over: one non-streamed
reply, produced once its stream is complete.

Servers that can pump a body on their event loop instead of holding a thread for it
advertise it through the WSGI environ key :data:`ASYNC_BODY_KEY`, in the spirit of
``wsgi.file_wrapper``: ``environ[ASYNC_BODY_KEY](body)`` (either kind, a
:data:`LoopBody`) returns an iterable the app must return unchanged (werkzeug:
``Response(..., direct_passthrough=True)``), and the server then awaits
``body.opening()`` on its loop: a :class:`~llmbridge._sansio.framing.Reply` is sent as
the whole response (a whole answer, or an error before the first byte, with its own
status), ``None`` means the stream is under way and ``body`` is iterated with
``async for``. Under any other server either body is an ordinary iterable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Literal, TypeAlias

from .._core.stream import Stream
from .._exceptions import Cancelled, LLMBridgeError
from .._sansio.framing import Framer, Reply, SSEFramer, TextFramer

__all__ = ["ASYNC_BODY_KEY", "BodyFormat", "LoopBody", "StreamBody", "WholeBody"]

ASYNC_BODY_KEY = "llmbridge.async_body"

BodyFormat = Literal["sse", "text"]

# A stream's end, as each read raises it.
_End = (StopIteration, StopAsyncIteration, LLMBridgeError)


class _Body:
    """What both kinds of body share: the stream they answer, and closing it."""

    def __init__(self, stream: Stream, on_close: Callable[[], None] | None) -> None:
        self.stream = stream
        self._on_close = on_close
        self._closed = False

    def close(self) -> None:
        """Stop: cancels the request if it is still running. Idempotent; never blocks."""
        if self._closed:
            return
        self._closed = True
        self.stream.channel.cancel("the response was closed")
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    async def aclose(self) -> None:
        """The async twin of :meth:`close`."""
        self.close()


class StreamBody(_Body):
    """The bytes of one streamed response, readable from a thread or a coroutine.

    ``framer`` says what the bytes look like; without one, ``format`` picks a built-in:
    ``"sse"`` (each chunk an event ``data: {"text": ...}``, a comment every
    ``heartbeat`` seconds of silence, at the end ``event: done`` with finish reason and
    usage or ``event: error`` with a problem object) or ``"text"`` (the raw UTF-8 chunks;
    an error ends the body by raising, so the server drops the connection).

    ``start_timeout`` is for servers that await the first output on their loop (see
    :data:`ASYNC_BODY_KEY`): past it they answer :class:`~llmbridge.Timeout` (504) with
    :meth:`error_response`.

    One consumer at a time. :meth:`close` / :meth:`aclose` cancel the request if it is
    still running; they are idempotent, thread-safe, and ``on_close`` runs once.
    """

    def __init__(
        self,
        stream: Stream,
        *,
        format: BodyFormat = "sse",
        framer: Framer | None = None,
        heartbeat: float | None = 15.0,
        start_timeout: float | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if format not in ("sse", "text"):
            raise ValueError(f"format must be 'sse' or 'text', got {format!r}")
        if heartbeat is not None and heartbeat <= 0:
            raise ValueError(f"heartbeat must be > 0 or None, got {heartbeat!r}")
        if framer is None:
            # The request id lets the client point at the log line that holds the details.
            framer = (SSEFramer if format == "sse" else TextFramer)(request_id=stream.id)
        super().__init__(stream, on_close)
        self.format = format
        self.framer = framer
        self.heartbeat = heartbeat if framer.heartbeats else None
        #: How long a server that awaits the first output itself (``ASYNC_BODY_KEY``)
        #: may wait before answering 504; ``None``: no limit.
        self.start_timeout = start_timeout

    @property
    def media_type(self) -> str:
        """The response's content type."""
        return self.framer.media_type

    def error_response(self, error: BaseException) -> Reply:
        """The whole response for ``error`` when it happens before the first byte (a
        server that awaited the first output answers with it), with the request's id in
        ``X-Request-Id`` as on every other answer. Never raises."""
        reply = self.framer.error_response(error)
        if not any(name.lower() == "x-request-id" for name, _ in reply.headers):
            reply.headers.append(("X-Request-Id", self.stream.id))
        return reply

    async def opening(self) -> Reply | None:
        """Wait, on a loop, until the response may start: ``None`` once the first output
        is out, or the whole reply to send instead when the request failed before it
        (past ``start_timeout``: :class:`~llmbridge.Timeout`, which cancels it). For
        servers that pump the body on their loop (:data:`ASYNC_BODY_KEY`)."""
        try:
            await self.stream.await_started(self.start_timeout)
        except LLMBridgeError as error:
            return self.error_response(error)
        return None

    def _frame(self, text: str | None) -> bytes:
        """The bytes for one read: a chunk, or a heartbeat after silence."""
        return self.framer.heartbeat() if text is None else self.framer.text(text)

    def _last(self, end: BaseException) -> bytes:
        """The body's last bytes once the stream ended (``end``: the stop or the error
        its read raised). Re-raises what the framer can't say, or a cancellation we made
        ourselves by closing, so the server drops the connection."""
        if not isinstance(end, LLMBridgeError):
            return self.framer.end(self.stream.channel.completion())
        last = None if self._closed and isinstance(end, Cancelled) else self.framer.error(end)
        if last is None:
            raise end
        return last

    # The two loops are twins: only how they wait for text differs.

    def __iter__(self) -> Iterator[bytes]:
        read = self.stream.channel.next_text
        try:
            out = self.framer.head()
            while True:
                if out:
                    yield out
                try:
                    out = self._frame(read(self.heartbeat))
                except _End as end:
                    last = self._last(end)
                    break
            if last:
                yield last
        finally:
            self.close()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = self.stream.channel.anext_text
        try:
            out = self.framer.head()
            while True:
                if out:
                    yield out
                try:
                    out = self._frame(await read(self.heartbeat))
                except _End as end:
                    last = self._last(end)
                    break
            if last:
                yield last
        finally:
            self.close()


class WholeBody(_Body):
    """One whole (non-streamed) answer, produced without a thread waiting for it.

    ``answer`` is a coroutine function that returns the whole response once ``stream``
    is complete: the answer, or its error's own reply (it must not raise);
    ``answer_blocking`` is its twin for a thread. A server that pumps bodies on its loop
    (:data:`ASYNC_BODY_KEY`) awaits :meth:`opening` and sends the reply, status
    included; any other iterates the body on its thread and gets the reply's bytes under
    the status the app declared.

    One consumer. :meth:`close` cancels the request if it is still running; it is
    idempotent and thread-safe, and ``on_close`` runs once.
    """

    def __init__(
        self,
        stream: Stream,
        *,
        answer: Callable[[], Awaitable[Reply]],
        answer_blocking: Callable[[], Reply],
        media_type: str = "application/json",
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(stream, on_close)
        self.media_type = media_type
        self._answer = answer
        self._answer_blocking = answer_blocking

    async def opening(self) -> Reply:
        """The whole response, once the request is complete (on a loop). Never raises
        for the request's own failure: that is the reply."""
        return await self._answer()

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield self._answer_blocking().body
        finally:
            self.close()


#: What a server that pumps bodies on its loop takes (:data:`ASYNC_BODY_KEY`).
LoopBody: TypeAlias = StreamBody | WholeBody
