"""``wsgi.input``: the request body, moved from ``receive()`` to the app chunk by chunk.

The loop side (:func:`pump_input`) fills a small bounded memory stream; the app side
(:class:`WSGIInput`) reads it from whatever thread the app runs on. Reads go back to the
adapter's loop through the loop's token, not through anyio's worker-thread locals: a
Flask ``async def`` view reads its body on the bridge's background loop thread, which
is no anyio worker (reading there raised ``NoEventLoopError``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterator, MutableMapping
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["LoopPortal", "WSGIInput", "pump_input"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
T = TypeVar("T")


class LoopPortal:
    """Runs coroutine functions on the loop that made it, from any other thread.

    Made on the adapter's loop (it captures :func:`anyio.lowlevel.current_token`).
    :meth:`run` blocks the calling thread until the coroutine is done; calling it on the
    loop's own thread would deadlock, so it raises ``RuntimeError`` there instead.
    """

    __slots__ = ("_loop", "_token")

    @property
    def token(self) -> anyio.lowlevel.EventLoopToken:
        """The loop's anyio token (``anyio.from_thread.run(..., token=...)``)."""
        return self._token

    def __init__(self) -> None:
        self._token = anyio.lowlevel.current_token()
        self._loop = asyncio.get_running_loop()

    def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """``await fn(*args)`` on the loop; block this thread for the result."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError("a blocking WSGI call ran on the ASGI server's event loop")
        return anyio.from_thread.run(fn, *args, token=self._token)


class WSGIInput:
    """``wsgi.input``: the request body, read from any thread as it arrives.

    Reads block the calling thread (never the adapter's loop) until enough data came or
    the body ended; the end of the body, and a client that went away, read as EOF. One
    reader at a time (PEP 3333: the app's).
    """

    def __init__(
        self,
        chunks: MemoryObjectReceiveStream[bytes],
        portal: LoopPortal,
        *,
        first: bytes = b"",
        complete: bool = False,
    ) -> None:
        self._chunks = chunks
        self._portal = portal
        # The first chunk came with the request (``complete``: it was all of it), so a
        # small body is read without going back to the loop.
        self._buffer = bytearray(first)
        self._eof = complete

    def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            chunk = self._portal.run(self._chunks.receive)
        except (
            anyio.EndOfStream,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
            anyio.RunFinishedError,
        ):
            self._eof = True
            return False
        self._buffer += chunk
        return True

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def read(self, size: int | None = -1) -> bytes:
        """Read ``size`` bytes (fewer at the end of the body), or all if ``size < 0``."""
        if size is None or size < 0:
            while self._fill():
                pass
            return self._take(len(self._buffer))
        while len(self._buffer) < size and self._fill():
            pass
        return self._take(size)

    def readline(self, size: int | None = -1) -> bytes:
        """Read one line (with its ``\\n``), at most ``size`` bytes if ``size >= 0``."""
        limit = -1 if size is None else size
        start = 0
        while True:
            index = self._buffer.find(b"\n", start)
            if index >= 0:
                end = index + 1
                break
            if 0 <= limit <= len(self._buffer):
                end = limit
                break
            start = len(self._buffer)
            if not self._fill():
                end = len(self._buffer)
                break
        if limit >= 0:
            end = min(end, limit)
        return self._take(end)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        """Read lines until the end of the body, or until ``hint`` bytes were read."""
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


async def pump_input(
    receive: Receive,
    chunks: MemoryObjectSendStream[bytes],
    on_disconnect: Callable[[], None],
    *,
    body_done: bool = False,
) -> None:
    """Move the request body from ``receive`` into ``wsgi.input``, then watch for the
    client going away (``on_disconnect``). Waits (bounded buffer) while the app doesn't
    read; once the app stopped reading (the stream closed) the rest is dropped.
    ``body_done``: the body already ended (only watch for the disconnect)."""
    dropping = body_done
    if body_done:
        chunks.close()
    with chunks:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "http.request":
                data = message.get("body", b"")
                if data and not dropping:
                    try:
                        await chunks.send(data)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        dropping = True
                if not message.get("more_body", False):
                    chunks.close()
                    dropping = True
            elif kind == "http.disconnect":
                on_disconnect()
                return
