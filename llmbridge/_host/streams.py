"""The stream wire between a worker and the engine process: one JSON line per event.

Every submit goes over a connection of its own to the engine process's *stream socket*
(the HTTP socket's path plus :data:`STREAM_SUFFIX`). The worker writes one line, the
request (``{"prompt", "request_id", "params"}``); the engine process answers with lines:

- ``["t", text]``: a chunk of text;
- ``["h"]``: a heartbeat during silence;
- ``["d", {"id", "finish_reason", "usage"}]``: the end; the connection then closes;
- ``["e", problem]``: the end, as an error (a problem object naming the error's class,
  client-safe detail only); also the answer to a request refused at once.

Either side closing the connection is the other's news: a worker that goes (its consumer
left, or it died) cancels the request in the engine before its next step; an engine
process that dies ends every open stream at once (:func:`~llmbridge._host.client.unavailable`).

Why not the HTTP route: an HTTP response body costs a worker some 90 µs of CPU per chunk
through httpx, httpcore and h11, and the engine process another 40 µs through uvicorn,
which doubled the serving CPU per token (``benchmarks/shared_engine.py``); a line read
from an ``asyncio`` stream is a few microseconds. The HTTP socket keeps ``/v1``, the
stats, the health check and an SSE submit route for other clients (curl, a probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from .._core.engine import Submitter
from .._core.jobs import Job
from .._exceptions import BadRequest, LLMBridgeError
from .._sansio.framing import Outcome, Reply
from .._sansio.problem import problem
from .._sansio.sse import dumps
from .._web.body import StreamBody
from .wire import error_from_problem, parse_submit

__all__ = [
    "MAX_LINE",
    "STREAM_SUFFIX",
    "LineFramer",
    "StreamServer",
    "read_stream",
    "stream_socket_path",
]

logger = logging.getLogger("llmbridge.host")

#: The stream socket's path is the engine socket's plus this.
STREAM_SUFFIX = ".stream"

#: The longest line either side reads: a request with a long chat, a chunk a slow reader
#: let grow (bounded by the engine's ``max_unread``).
MAX_LINE = 16 << 20

_HEARTBEAT = b'["h"]\n'


def stream_socket_path(socket_path: str) -> str:
    """The stream socket that goes with the engine socket ``socket_path``."""
    return socket_path + STREAM_SUFFIX


def _line(value: Any) -> bytes:
    return (dumps(value) + "\n").encode()


class LineFramer:
    """The engine side of the wire as a :class:`~llmbridge._sansio.framing.Framer`, so
    :class:`~llmbridge._web.body.StreamBody` drives it like every other response."""

    media_type = "application/x-ndjson"
    heartbeats = True

    def __init__(self, *, request_id: str | None = None) -> None:
        self.request_id = request_id

    def head(self) -> bytes:
        """Nothing: the first line is the first chunk."""
        return b""

    def text(self, text: str) -> bytes:
        """``["t", text]``."""
        return _line(("t", text))

    def heartbeat(self) -> bytes:
        """``["h"]``."""
        return _HEARTBEAT

    def end(self, outcome: Outcome) -> bytes:
        """``["d", {...}]`` with the finish reason and usage."""
        usage = {
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.total_tokens,
        }
        return _line(
            ("d", {"id": outcome.id, "finish_reason": outcome.finish_reason, "usage": usage})
        )

    def error(self, error: BaseException) -> bytes:
        """``["e", problem]``."""
        return _line(("e", problem(error, self.request_id)))

    def error_response(self, error: BaseException) -> Reply:
        """The error line (the wire has no status line: the problem carries the status)."""
        body = problem(error, self.request_id)
        return Reply(int(body["status"]), _line(("e", body)))


class StreamServer:
    """Serves submits on the stream socket (``asyncio.start_unix_server``'s callback).

    Thread-safe to build; its handlers run on the engine process's event loop.
    :meth:`wait_closed` lets the streams still open finish, up to a timeout, when the
    process stops.
    """

    def __init__(self, submitter: Submitter, *, heartbeat: float | None = 15.0) -> None:
        self.submitter = submitter
        self.heartbeat = heartbeat
        self._open: set[asyncio.Task[Any]] = set()

    @property
    def connections(self) -> int:
        """Stream connections open right now."""
        return len(self._open)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._open.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError):
            pass  # the worker went: its request was cancelled with the body
        finally:
            if task is not None:
                self._open.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                return  # the worker left before its request was whole
            prompt, request_id, params = parse_submit(line)
            stream = self.submitter.submit(prompt, request_id=request_id, **params)
        except LLMBridgeError as error:
            writer.write(LineFramer().error_response(error).body)
            await writer.drain()
            return
        except ValueError:  # StreamReader: a line over the limit
            writer.write(LineFramer().error_response(_too_long()).body)
            await writer.drain()
            # Read (and drop) what is still coming for a moment before closing, so the
            # sender reads our answer instead of a reset.
            with contextlib.suppress(TimeoutError, ConnectionError, OSError):
                await asyncio.wait_for(_discard(reader), 2.0)
            return
        body = StreamBody(stream, framer=LineFramer(request_id=stream.id), heartbeat=self.heartbeat)
        watch = asyncio.ensure_future(_close_on_eof(reader, body))
        try:
            async for out in body:
                writer.write(out)
                await writer.drain()
        except LLMBridgeError:
            pass  # cancelled: the worker closed its end (the body was closed for it)
        finally:
            watch.cancel()
            body.close()

    async def wait_closed(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for the open streams to end, then cut them."""
        pending = set(self._open)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            task.cancel()


def _too_long() -> BadRequest:
    error = BadRequest(f"the request line is over {MAX_LINE} bytes")
    error.status = 413
    return error


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


async def _close_on_eof(reader: asyncio.StreamReader, body: StreamBody) -> None:
    # The worker sends nothing after its request: any read that returns is its end.
    try:
        await reader.read(1)
    except (ConnectionError, OSError):
        pass
    body.close()


async def read_stream(
    path: str,
    request: bytes,
    job: Job,
    *,
    connect_timeout: float | None,
    timeout: float | None,
) -> None:
    """Send ``request`` (one JSON object, no newline) to the stream socket at ``path`` and
    write what comes back to ``job``: chunks, then its end or its error (raised as the
    engine process's class). Leaving (the end, an error, cancellation) closes the
    connection, which cancels the request in the engine process if it still runs.

    Raises ``OSError`` / ``ConnectionError`` / ``TimeoutError`` when the socket can't be
    reached or breaks, and ``EOFError`` when it closes before the last line.
    """
    if len(request) >= MAX_LINE:
        raise _too_long()  # the engine process would refuse it: don't send it
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(path, limit=MAX_LINE), connect_timeout
    )
    try:
        writer.write(request + b"\n")
        readline = reader.readline
        loads = json.loads
        while True:
            if timeout is None:
                line = await readline()
            else:
                line = await asyncio.wait_for(readline(), timeout)
            if not line.endswith(b"\n"):
                raise EOFError("the stream ended before its last line")
            event = loads(line)
            kind = event[0]
            if kind == "t":
                if event[1] and not await job.aemit(event[1]):
                    return  # the consumer left: closing the connection tells the engine
            elif kind == "d":
                end = event[1]
                usage = end.get("usage") or {}
                job.finish(
                    str(end.get("finish_reason") or "stop"),
                    prompt_tokens=usage.get("prompt_tokens"),
                    completion_tokens=usage.get("completion_tokens"),
                )
                return
            elif kind == "e":
                raise error_from_problem(event[1], event[1].get("status"))
    finally:
        writer.close()
