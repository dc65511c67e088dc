"""A WSGI → ASGI 3 adapter where streams don't hold threads.

Each request's WSGI call (the app, then the iteration of its body, then ``close()``)
runs in one worker thread from a bounded pool (an anyio :class:`~anyio.CapacityLimiter`
over :func:`anyio.to_thread.run_sync`), in one contextvars context. The request body
reaches ``wsgi.input`` chunk by chunk through a small bounded buffer; response chunks go
out as the app produces them, one at a time, so a slow client slows the app instead of
filling memory.

A view that streams a :class:`~llmbridge._body.StreamBody` can give its thread back: the
adapter offers ``environ[ASYNC_BODY_KEY]``, and when the app returns what that callable
made, the worker thread is released and the body is pumped with ``async for`` on the event
loop. A client disconnect cancels the pump, which closes the body and cancels the engine
job. The iterable's ``close()`` is called exactly once whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from types import TracebackType
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._exceptions import LLMBridgeError
from .._sansio.framing import Reply
from .._sansio.problem import problem, retry_after_value
from .body import ASYNC_BODY_KEY, StreamBody
from .drain import Drain, as_hooks, call_hook, find_engines

__all__ = ["WSGIMiddleware"]

logger = logging.getLogger("llmbridge.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], None]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

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


class _AsyncBody:
    """What ``environ[ASYNC_BODY_KEY](body)`` returns; the app returns it unchanged.

    The adapter that made it pumps ``body`` on its loop; any other code that gets it (a
    WSGI middleware that iterates the response) sees an ordinary iterable over ``body``.
    """

    __slots__ = ("_exchange", "body")

    def __init__(self, body: StreamBody, exchange: _Exchange) -> None:
        self.body = body
        self._exchange = exchange

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        """Close the body: cancels the request if it is still running."""
        self.body.close()


class _Input:
    """``wsgi.input``: the request body, read from a worker thread as it arrives.

    Reads block the calling worker thread (never the loop) until enough data came or the
    body ended; the end of the body, and a client that went away, read as EOF.
    """

    def __init__(self, chunks: MemoryObjectReceiveStream[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            chunk = anyio.from_thread.run(self._chunks.receive)
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
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


class _Exchange:
    """One request's response state, shared by the loop and its worker thread.

    The thread only touches ``status``/``headers`` before the first send, and sends
    through :meth:`send_from_thread`, which runs on the loop while the thread waits: the
    two never write the same field at the same time.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self.raw_send = send
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.remaining: int | None = None  # bytes the app's Content-Length still allows
        self.headers_sent = False
        self.disconnected = False
        self.disconnect_event = anyio.Event()

    # -- WSGI callables (worker thread) ---------------------------------------------

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.headers_sent:
                    # Too late to change the response: let the error end it (PEP 3333).
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # break the traceback's reference cycle
        elif self.status is not None:
            raise RuntimeError("start_response() called twice without exc_info")
        self.status = _parse_status(status)
        self.headers = _encode_headers(headers)
        self.remaining = _declared_length(self.headers)
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
        """The legacy ``write()`` callable: send ``data`` now."""
        if self.status is None:
            raise RuntimeError("write() called before start_response()")
        if not isinstance(data, bytes):
            raise TypeError(f"write() takes bytes, got {type(data).__name__}")
        data = self.clamp(data)
        if data:
            self.send_from_thread(data, more_body=True)

    def async_body(self, body: StreamBody) -> _AsyncBody:
        """``environ[ASYNC_BODY_KEY]``: hand ``body`` to the loop once the app returns."""
        if not isinstance(body, StreamBody):
            raise TypeError(f"{ASYNC_BODY_KEY} takes a StreamBody, got {type(body).__name__}")
        return _AsyncBody(body, self)

    def send_from_thread(self, data: bytes, *, more_body: bool) -> None:
        if self.disconnected:
            raise ClientDisconnected("the client disconnected")
        anyio.from_thread.run(self.send_body, data, more_body)

    # -- the loop ---------------------------------------------------------------------

    async def send_body(self, data: bytes, more_body: bool) -> None:
        """Send the headers if they are not out yet, then ``data``."""
        if self.disconnected:
            raise ClientDisconnected("the client disconnected")
        try:
            if not self.headers_sent:
                assert self.status is not None
                self.headers_sent = True
                await self._send(
                    {"type": "http.response.start", "status": self.status, "headers": self.headers}
                )
            await self._send({"type": "http.response.body", "body": data, "more_body": more_body})
        except OSError as exc:  # some servers raise on a closed connection
            self.disconnected = True
            self.disconnect_event.set()
            raise ClientDisconnected("the client disconnected") from exc

    def set_disconnected(self) -> None:
        self.disconnected = True
        self.disconnect_event.set()


def _parse_status(status: str) -> int:
    if not isinstance(status, str):
        raise TypeError(f"status must be a str like '200 OK', got {type(status).__name__}")
    code = status[:3]
    if len(status) < 3 or not code.isdigit() or (len(status) > 3 and status[3] != " "):
        raise ValueError(f"status must look like '200 OK', got {status!r}")
    value = int(code)
    if value < 100:
        raise ValueError(f"status code must be >= 100, got {status!r}")
    return value


def _encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
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


def build_environ(scope: Scope, wsgi_input: Any) -> dict[str, Any]:
    """The PEP 3333 environ of an ASGI HTTP ``scope`` (without server extensions)."""
    root = scope.get("root_path", "")
    raw_path = scope.get("raw_path")
    root_native = root.encode("utf-8").decode("latin-1")
    if raw_path:
        # The raw target keeps bytes that are not UTF-8: WSGI wants them as latin-1.
        path = unquote_to_bytes(raw_path.split(b"?", 1)[0]).decode("latin-1")
    else:
        path = scope["path"].encode("utf-8").decode("latin-1")
    if root_native and (path == root_native or path.startswith(root_native + "/")):
        path = path[len(root_native) :]
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root_native,
        "PATH_INFO": path,
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": wsgi_input,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        # The server has de-chunked the body and signals its end: reading to EOF is safe.
        "wsgi.input_terminated": True,
        "asgi.scope": scope,
    }
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1")
        if "_" in name:
            # ``X_Forwarded_For`` would collide with ``X-Forwarded-For``: drop it, as
            # gunicorn, nginx and Apache do.
            continue
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        value = raw_value.decode("latin-1")
        if key in environ:
            value = environ[key] + ("; " if key == "HTTP_COOKIE" else ",") + value
        environ[key] = value
    server = scope.get("server")
    if server:
        environ["SERVER_NAME"] = str(server[0])
        environ["SERVER_PORT"] = str(server[1]) if server[1] is not None else "80"
    else:
        host = environ.get("HTTP_HOST", "")
        name, colon, port = host.rpartition(":")
        if not colon or "]" in port:  # no port, or the colon was inside an IPv6 literal
            name, port = host, ""
        environ["SERVER_NAME"] = name or "localhost"
        environ["SERVER_PORT"] = port or ("443" if environ["wsgi.url_scheme"] == "https" else "80")
    client = scope.get("client")
    if client:
        environ["REMOTE_ADDR"] = str(client[0])
        environ["REMOTE_PORT"] = str(client[1])
    return environ


async def send_problem(send: Send, error: BaseException) -> None:
    """Answer with ``application/problem+json`` for ``error`` (never a traceback)."""
    import json

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


async def _send_reply(send: Send, reply: Reply) -> None:
    data = reply.body
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    headers.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class WSGIMiddleware:
    """Serve a WSGI app (Flask, or any PEP 3333 app) from an ASGI 3 server.

    A drop-in for ``a2wsgi.WSGIMiddleware`` and ``asgiref.wsgi.WsgiToAsgi``:
    ``app = WSGIMiddleware(flask_app)``, then ``uvicorn module:app`` or
    ``gunicorn -k uvicorn_worker.UvicornWorker module:app``.

    Options (keyword-only):

    - ``workers``: threads for WSGI calls (default 8). A call holds one from the app's
      start to the end of its body, unless it streams through ``ASYNC_BODY_KEY``.
    - ``input_buffer``: request-body chunks buffered ahead of the app (default 4).
    - ``engines``: engines (or submitters wrapping one) to start at lifespan startup and
      close on shutdown; a Flask app's ``app.extensions["llmbridge"]`` bridge is found on
      its own.
    - ``drain_timeout``: seconds from SIGTERM (or lifespan shutdown) that in-flight streams
      may still run before they end with a final ``event: error`` (default 10; keep it
      under gunicorn's ``graceful_timeout``). ``retry_after``: the ``Retry-After`` of the
      503 new requests get meanwhile (default 5).
    - ``on_startup`` / ``on_shutdown``: callables (sync or async) run at lifespan
      startup, and at shutdown once the streams are done.
    - ``handle_signals``: chain a SIGTERM/SIGINT handler in front of the server's to start
      draining before the server waits for connections (default True).

    Safe to share between event loops' requests; one instance serves one process.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        workers: int = 8,
        input_buffer: int = 4,
        engines: Iterable[Any] = (),
        drain_timeout: float = 10.0,
        retry_after: float = 5.0,
        on_startup: Callable[[], Any] | Iterable[Callable[[], Any]] | None = None,
        on_shutdown: Callable[[], Any] | Iterable[Callable[[], Any]] | None = None,
        handle_signals: bool = True,
    ) -> None:
        if not callable(app):
            raise TypeError(f"WSGIMiddleware needs a WSGI callable, got {type(app).__name__}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if isinstance(input_buffer, bool) or not isinstance(input_buffer, int) or input_buffer < 0:
            raise ValueError(f"input_buffer must be an int >= 0, got {input_buffer!r}")
        self.app = app
        self.workers = workers
        self.input_buffer = input_buffer
        self.handle_signals = handle_signals
        self.drain = Drain(timeout=drain_timeout, retry_after=retry_after)
        self._engines = list(engines)
        self._on_startup = as_hooks(on_startup)
        self._on_shutdown = as_hooks(on_shutdown)
        self._limiter: anyio.CapacityLimiter | None = None
        self._limiter_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<WSGIMiddleware {self.app!r} workers={self.workers}>"

    @property
    def engines(self) -> list[Any]:
        """The engines this adapter starts and closes (given ones, then the app's)."""
        return find_engines(self._engines, self.app)

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The pool's limiter on the running loop (one per loop: anyio limiters are
        loop-bound)."""
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._limiter_loop is not loop:
            self._limiter = anyio.CapacityLimiter(self.workers)
            self._limiter_loop = loop
        return self._limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1000})
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    # -- lifespan ---------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:
                    logger.exception("shutdown failed")
                    await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Start the engines, run ``on_startup``, listen for SIGTERM. Lifespan calls it."""
        self.drain.bind(asyncio.get_running_loop(), lambda: self.engines)
        for engine in self.engines:
            engine.start()
        for hook in self._on_startup:
            await call_hook(hook)
        if self.handle_signals:
            self.drain.install_signal_handlers()

    async def shutdown(self) -> None:
        """Drain (if a signal did not already), close engines, run ``on_shutdown``."""
        if self.drain._loop is None:
            self.drain.bind(asyncio.get_running_loop(), lambda: self.engines)
        try:
            await self.drain.run()
        finally:
            self.drain.restore_signal_handlers()
        for hook in self._on_shutdown:
            await call_hook(hook)

    # -- requests ---------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.drain.admitting:
            await send_problem(send, self.drain.refusal())
            return
        exchange = _Exchange(send)
        chunks_in, chunks_out = anyio.create_memory_object_stream[bytes](self.input_buffer)
        environ = build_environ(scope, _Input(chunks_out))
        environ[ASYNC_BODY_KEY] = exchange.async_body
        failure: BaseException | None = None
        self.drain.enter()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_pump_input, receive, chunks_in, exchange)
                handle: _AsyncBody | None = None
                try:
                    handle = await anyio.to_thread.run_sync(
                        self._call, environ, exchange, limiter=self.limiter
                    )
                except ClientDisconnected:
                    pass
                except Exception as exc:
                    failure = exc
                # The app can't read its body any more: drop the rest, so a disconnect is seen.
                chunks_out.close()
                if handle is not None:
                    try:
                        await self._pump(handle, exchange, tg)
                    except Exception as exc:
                        failure = exc
                tg.cancel_scope.cancel()
        finally:
            self.drain.leave()
            chunks_in.close()
            chunks_out.close()
        if failure is None:
            return
        if exchange.headers_sent or exchange.disconnected:
            raise failure  # the response is under way: the server must abort it
        await send_problem(send, failure)
        if not isinstance(failure, LLMBridgeError):
            # The client got its JSON 500; the server logs the crash, as for any ASGI app
            # (and test transports that re-raise app errors see it).
            raise failure

    def _call(self, environ: dict[str, Any], exchange: _Exchange) -> _AsyncBody | None:
        """The WSGI call, on a worker thread: app, iteration, close()."""
        iterable = self.app(environ, exchange.start_response)
        if isinstance(iterable, _AsyncBody) and iterable._exchange is exchange:
            return iterable  # the loop owns it now, close() included
        try:
            single = isinstance(iterable, list | tuple) and len(iterable) == 1
            for chunk in iterable:
                if not isinstance(chunk, bytes):
                    raise TypeError(f"a WSGI app must yield bytes, got {type(chunk).__name__}")
                if exchange.status is None:
                    raise RuntimeError("the app produced its body before start_response()")
                chunk = exchange.clamp(chunk)
                if chunk:
                    if single and not exchange.headers_sent:
                        _set_content_length(exchange, len(chunk))
                    exchange.send_from_thread(chunk, more_body=True)
                if exchange.complete:
                    break  # all the declared bytes are out: stop iterating (PEP 3333)
            if exchange.status is None:
                raise RuntimeError("the app returned without calling start_response()")
            if single and not exchange.headers_sent:
                _set_content_length(exchange, 0)
            exchange.send_from_thread(b"", more_body=False)
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()
        return None

    async def _pump(self, handle: _AsyncBody, exchange: _Exchange, tg: anyio.abc.TaskGroup) -> None:
        """Send a stream body from the loop; its thread went back to the pool."""
        body = handle.body
        self.drain.track(body)
        try:
            if exchange.status is None:
                raise RuntimeError("the app returned its body without calling start_response()")
            with anyio.CancelScope() as scope:
                tg.start_soon(_cancel_on, exchange.disconnect_event, scope)
                try:
                    # A view may hand over a stream before its first output: an error
                    # before any text still gets its own status, not a broken 200.
                    await body.stream.await_started(body.start_timeout)
                except LLMBridgeError as error:  # Timeout included: it cancelled the job
                    # In the body's own shape (problem+json, OpenAI's error under /v1).
                    await _send_reply(exchange.raw_send, body.error_response(error))
                    return
                chunks = body.__aiter__()
                try:
                    async for chunk in chunks:
                        await exchange.send_body(chunk, True)
                finally:
                    aclose = getattr(chunks, "aclose", None)
                    if aclose is not None:
                        with anyio.CancelScope(shield=True):
                            await aclose()
                await exchange.send_body(b"", False)
        except ClientDisconnected:
            pass
        finally:
            self.drain.untrack(body)
            handle.close()


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return None


def _set_content_length(exchange: _Exchange, length: int) -> None:
    if not any(name == b"content-length" for name, _ in exchange.headers):
        exchange.headers.append((b"content-length", str(length).encode()))


async def _cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _pump_input(
    receive: Receive, chunks: MemoryObjectSendStream[bytes], exchange: _Exchange
) -> None:
    """Move the request body from ``receive`` into ``wsgi.input``, then watch for the
    client going away. Blocks (bounded buffer) while the app doesn't read."""
    dropping = False
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
                exchange.set_disconnected()
                return


def to_asgi(app: WSGIApp, **options: Any) -> WSGIMiddleware:
    """``WSGIMiddleware(app, **options)``: see it for the options."""
    return WSGIMiddleware(app, **options)
