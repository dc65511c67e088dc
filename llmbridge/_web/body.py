"""Response bodies over a :class:`~llmbridge.Stream`, shared by every integration.

:class:`StreamBody` turns a stream into bytes (SSE events or plain text) for a server to
send, as a sync iterable (a WSGI server's thread) and an async one (an ASGI server's
loop). Closing it (a WSGI ``close()``, a client disconnect) cancels the request.

Servers that can pump a body on their event loop instead of holding a thread for it
advertise it through the WSGI environ key :data:`ASYNC_BODY_KEY`, in the spirit of
``wsgi.file_wrapper``: ``environ[ASYNC_BODY_KEY](body)`` returns an iterable the app must
return unchanged (werkzeug: ``Response(..., direct_passthrough=True)``), and the server
then iterates ``body`` with ``async for`` on its loop. Under any other server the body is
an ordinary iterable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Literal

from .._core.stream import Stream
from .._exceptions import Cancelled, LLMBridgeError
from .._sansio.problem import problem
from .._sansio.sse import encode_chunk, encode_comment, encode_done, encode_error

__all__ = ["ASYNC_BODY_KEY", "BodyFormat", "StreamBody"]

ASYNC_BODY_KEY = "llmbridge.async_body"

BodyFormat = Literal["sse", "text"]


class StreamBody:
    """The bytes of one streamed response, readable from a thread or a coroutine.

    ``start_timeout`` is for servers that await the first output on their loop (see
    :data:`ASYNC_BODY_KEY`): past it they answer :class:`~llmbridge.Timeout` (504).

    ``format="sse"``: each chunk is an event ``data: {"text": ...}``; a comment every
    ``heartbeat`` seconds of silence; at the end ``event: done`` with finish reason and
    usage, or ``event: error`` with a problem object. ``format="text"``: the raw UTF-8
    chunks; an error ends the body by raising (the server drops the connection).

    One consumer at a time. :meth:`close` / :meth:`aclose` cancel the request if it is
    still running; they are idempotent, and ``on_close`` runs once.
    """

    def __init__(
        self,
        stream: Stream,
        *,
        format: BodyFormat = "sse",
        heartbeat: float | None = 15.0,
        start_timeout: float | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if format not in ("sse", "text"):
            raise ValueError(f"format must be 'sse' or 'text', got {format!r}")
        if heartbeat is not None and heartbeat <= 0:
            raise ValueError(f"heartbeat must be > 0 or None, got {heartbeat!r}")
        self.stream = stream
        self.format = format
        self.heartbeat = heartbeat if format == "sse" else None
        #: How long a server that awaits the first output itself (``ASYNC_BODY_KEY``)
        #: may wait before answering 504; ``None``: no limit.
        self.start_timeout = start_timeout
        self._on_close = on_close
        self._closed = False

    @property
    def media_type(self) -> str:
        """The response's content type."""
        return "text/event-stream" if self.format == "sse" else "text/plain; charset=utf-8"

    def _chunk(self, text: str) -> bytes:
        return encode_chunk(text) if self.format == "sse" else text.encode()

    def _end(self) -> bytes:
        completion = self.stream.channel.completion()
        return encode_done(
            {
                "id": completion.id,
                "finish_reason": completion.finish_reason,
                "usage": {
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "total_tokens": completion.total_tokens,
                },
            }
        )

    def _error(self, error: BaseException) -> bytes:
        # The request id lets the client point at the log line that holds the details.
        return encode_error(problem(error, self.stream.id))

    def _frame(self, text: str | None) -> bytes:
        """The bytes for one read: a chunk, or a heartbeat comment after silence."""
        return encode_comment() if text is None else self._chunk(text)

    def _last(self, error: LLMBridgeError | None) -> bytes | None:
        """The body's last bytes once the stream ended (``error``: how it failed): the
        ``done`` or ``error`` event. Re-raises what a text body or a closed one can't
        frame, so the server drops the connection."""
        if error is None:
            return self._end() if self.format == "sse" else None
        if self.format == "text" or (self._closed and isinstance(error, Cancelled)):
            raise error
        return self._error(error)

    # The two loops are twins: only how they wait for text differs.

    def __iter__(self) -> Iterator[bytes]:
        channel = self.stream.channel
        try:
            while True:
                try:
                    text = channel.next_text(self.heartbeat)
                except StopIteration:
                    last = self._last(None)
                    break
                except LLMBridgeError as error:
                    last = self._last(error)
                    break
                yield self._frame(text)
            if last is not None:
                yield last
        finally:
            self.close()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        channel = self.stream.channel
        try:
            while True:
                try:
                    text = await channel.anext_text(self.heartbeat)
                except StopAsyncIteration:
                    last = self._last(None)
                    break
                except LLMBridgeError as error:
                    last = self._last(error)
                    break
                yield self._frame(text)
            if last is not None:
                yield last
        finally:
            self.close()

    def close(self) -> None:
        """Stop: cancels the request if it is still running. Idempotent."""
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
