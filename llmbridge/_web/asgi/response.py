"""One request's response: ``start_response``, ``write()``, status and header checks, and
the problem+json answer of a request that failed before its response began."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from types import TracebackType
from typing import Any

from ..._sansio.framing import Reply
from ..._sansio.problem import problem, retry_after_value
from ..body import ASYNC_BODY_KEY, LoopBody, StreamBody, WholeBody
from .input import LoopPortal

__all__ = ["AsyncBody", "ClientDisconnected", "Exchange", "send_problem", "send_reply"]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

# Framing is the ASGI server's job: a WSGI app must not set these (PEP 3333).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)


class ClientDisconnected(OSError):
    """The client went away while the app was sending its response."""


class AsyncBody:
    """What ``environ[ASYNC_BODY_KEY](body)`` returns; the app returns it unchanged.

    The adapter that made it pumps ``body`` on its loop; any other code that gets it (a
    WSGI middleware that iterates the response) sees an ordinary iterable over ``body``.
    """

    __slots__ = ("_on_close", "body", "exchange")

    def __init__(
        self, body: LoopBody, exchange: Exchange, on_close: Callable[[LoopBody], None]
    ) -> None:
        self.body = body
        self.exchange = exchange
        self._on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        """Close the body: cancels the request if it is still running. Idempotent."""
        try:
            self.body.close()
        finally:
            self._on_close(self.body)


class Exchange:
    """One request's response state, shared by the loop and the app's thread.

    The thread only touches ``status``/``headers`` before the first send, and sends
    through :meth:`send_from_thread`, which runs on the loop while the thread waits: the
    two never write the same field at the same time.
    """

    def __init__(
        self,
        send: Send,
        portal: LoopPortal,
        track: Callable[[LoopBody], None],
        untrack: Callable[[LoopBody], None],
    ) -> None:
        self.raw_send = send
        #: The adapter's loop, for the app's thread.
        self.portal = portal
        self._track = track
        self._untrack = untrack
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.remaining: int | None = None  # bytes the app's Content-Length still allows
        self.headers_sent = False
        self.disconnected = False
        #: The body the loop is pumping, closed when the client goes away.
        self.body: LoopBody | None = None

    # -- WSGI callables (the app's thread) --------------------------------------------

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], None]:
        """PEP 3333 ``start_response``; returns :meth:`write`."""
        if exc_info is not None:
            try:
                if self.headers_sent:
                    # Too late to change the response: let the error end it (PEP 3333).
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # break the traceback's reference cycle
        elif self.status is not None:
            raise RuntimeError("start_response() called twice without exc_info")
        self.status = parse_status(status)
        self.headers = encode_headers(headers)
        self.remaining = declared_length(self.headers)
        return self.write

    def clamp(self, data: bytes) -> bytes:
        """Cut ``data`` to what the app's Content-Length still allows (PEP 3333: never
        send more than declared)."""
        if self.remaining is None:
            return data
        data = data[: self.remaining]
        self.remaining -= len(data)
        return data

    @property
    def complete(self) -> bool:
        """True once the declared Content-Length has been sent: stop iterating."""
        return self.remaining == 0

    def write(self, data: bytes) -> None:
        """The legacy ``write()`` callable: send ``data`` now (blocks the thread)."""
        if self.status is None:
            raise RuntimeError("write() called before start_response()")
        if not isinstance(data, bytes):
            raise TypeError(f"write() takes bytes, got {type(data).__name__}")
        data = self.clamp(data)
        if data:
            self.send_from_thread(data, more_body=True)

    def async_body(self, body: object) -> AsyncBody:
        """``environ[ASYNC_BODY_KEY]``: hand ``body`` to the loop once the app returns.

        The body is known to the drain from now on, whoever ends up iterating it."""
        if not isinstance(body, StreamBody | WholeBody):
            name = type(body).__name__
            raise TypeError(f"{ASYNC_BODY_KEY} takes a StreamBody or a WholeBody, got {name}")
        self._track(body)
        return AsyncBody(body, self, self._untrack)

    def send_from_thread(self, data: bytes, *, more_body: bool) -> None:
        """Send ``data`` from the app's thread; blocks it until the loop sent it."""
        if self.disconnected:
            raise ClientDisconnected("the client disconnected")
        self.portal.run(self.send_body, data, more_body)

    # -- the loop ---------------------------------------------------------------------

    async def send_body(self, data: bytes, more_body: bool) -> None:
        """Send the headers if they are not out yet, then ``data``."""
        if self.disconnected:
            raise ClientDisconnected("the client disconnected")
        try:
            if not self.headers_sent:
                assert self.status is not None
                self.headers_sent = True
                await self.raw_send(
                    {"type": "http.response.start", "status": self.status, "headers": self.headers}
                )
            if data or more_body:
                await self.raw_send(
                    {"type": "http.response.body", "body": data, "more_body": more_body}
                )
            else:  # the end, spelled as asgiref does (body and more_body at their defaults)
                await self.raw_send({"type": "http.response.body"})
        except OSError as exc:  # some servers raise on a closed connection
            self.set_disconnected()
            raise ClientDisconnected("the client disconnected") from exc

    async def send_reply(self, reply: Reply) -> None:
        """Send ``reply`` as the whole response instead of the app's body: its status,
        headers and bytes, plus the app's own headers that it doesn't set (say, a CORS
        header an ``after_request`` hook added)."""
        if self.disconnected:
            raise ClientDisconnected("the client disconnected")
        own = {name.lower().encode("latin-1") for name, _ in reply.headers}
        own.add(b"content-length")
        self.headers_sent = True
        try:
            await send_reply(
                self.raw_send, reply, [(k, v) for k, v in self.headers if k not in own]
            )
        except OSError as exc:
            self.set_disconnected()
            raise ClientDisconnected("the client disconnected") from exc

    def client_gone(self) -> bool:
        """Whether the client went away (a call, so checks after an ``await`` re-read it)."""
        return self.disconnected

    def set_disconnected(self) -> None:
        """The client went away: close the body being pumped, if any (on the loop)."""
        self.disconnected = True
        if self.body is not None:
            self.body.close()

    def set_single_length(self, length: int) -> None:
        """A one-chunk body: declare its length unless the app did."""
        if not any(name == b"content-length" for name, _ in self.headers):
            self.headers.append((b"content-length", str(length).encode()))


def parse_status(status: str) -> int:
    """The code of a WSGI status line (``"200 OK"``). Raises TypeError/ValueError."""
    if not isinstance(status, str):
        raise TypeError(f"status must be a str like '200 OK', got {type(status).__name__}")
    code = status[:3]
    if len(status) < 3 or not code.isdigit() or (len(status) > 3 and status[3] != " "):
        raise ValueError(f"status must look like '200 OK', got {status!r}")
    value = int(code)
    if value < 100:
        raise ValueError(f"status code must be >= 100, got {status!r}")
    return value


def encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """WSGI response headers as ASGI ones, hop-by-hop headers dropped. Raises
    TypeError/ValueError for what PEP 3333 forbids."""
    # PEP 3333 asks for a list of tuples; like asgiref and werkzeug, also take lists as
    # pairs (apps in the wild send them), but nothing looser.
    if not isinstance(headers, list):
        raise TypeError(f"headers must be a list of (name, value), got {type(headers).__name__}")
    encoded: list[tuple[bytes, bytes]] = []
    for item in headers:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TypeError(f"each header must be a (name, value) pair, got {item!r}")
        name, value = item
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"header names and values must be str, got {item!r}")
        if any(c in name for c in "\r\n:") or not name or any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid header {item!r}")
        raw_name = name.lower().encode("latin-1")
        if raw_name in _HOP_BY_HOP:
            continue
        encoded.append((raw_name, value.encode("latin-1")))
    return encoded


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The response's Content-Length, if it declared a valid one."""
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return None


async def send_problem(send: Send, error: BaseException) -> None:
    """Answer with ``application/problem+json`` for ``error`` (never a traceback)."""
    body = problem(error)
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(data)).encode()),
    ]
    retry_after = retry_after_value(error)
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    await send({"type": "http.response.start", "status": body["status"], "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def send_reply(
    send: Send, reply: Reply, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Send a whole :class:`~llmbridge._sansio.framing.Reply` (a whole answer, or a
    body's own error shape: problem+json, OpenAI's error object under ``/v1``), with
    ``extra`` headers (already encoded) after its own."""
    data = reply.body
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    headers += extra or ()
    headers.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})
