"""ASGI plumbing shared by the engine process's routes: read a body, send a reply, and
stream a :class:`~llmbridge._web.body.StreamBody` while watching for the client to go."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from .._core.stream import Stream
from .._exceptions import BadRequest, LLMBridgeError
from .._sansio.framing import Reply
from .._web.body import StreamBody

__all__ = ["Receive", "Scope", "Send", "header", "read_body", "reply", "stream_reply"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The largest request body accepted (a long chat fits; a runaway client does not).
MAX_BODY = 16 << 20


def header(scope: Scope, name: bytes) -> str | None:
    """The first request header ``name`` (lower-case bytes), or ``None``."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def read_body(receive: Receive, limit: int = MAX_BODY) -> bytes:
    """The whole request body; :class:`~llmbridge.BadRequest` (413) past ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client left before sending its request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            error = BadRequest(f"the request body is over {limit} bytes")
            error.status = 413
            raise error
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def reply(send: Send, answer: Reply) -> None:
    """Send a whole response."""
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in answer.headers],
        }
    )
    await send({"type": "http.response.body", "body": answer.body})


async def stream_reply(
    receive: Receive,
    send: Send,
    stream: Stream,
    body: StreamBody,
    headers: dict[str, str],
    *,
    start_timeout: float | None = None,
    on_error: Callable[[LLMBridgeError], Reply] | None = None,
) -> None:
    """Wait for the first output (an early error is answered whole, by ``on_error`` or
    the body's framer), then send ``body`` chunk by chunk.

    The reader of this response is the request's consumer: when it goes (``http.disconnect``:
    a closed response, a dead worker), the body closes and the request is cancelled in
    the engine before its next step.
    """
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            body.close()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            try:
                await stream.await_started(start_timeout)
            except LLMBridgeError as error:
                await reply(send, (on_error or body.error_response)(error))
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", body.media_type.encode()),
                        *((k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()),
                    ],
                }
            )
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            body.close()
            tg.cancel_scope.cancel()
