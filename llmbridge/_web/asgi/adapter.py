"""A WSGI → ASGI 3 adapter where streams don't hold threads.

Each request's WSGI call (the app, then the iteration of its body, then ``close()``)
runs in one worker thread from a bounded pool (a
:class:`~concurrent.futures.ThreadPoolExecutor` of ``workers`` threads), in one copy of
the request's contextvars. The request body's first message is handed to ``wsgi.input``
with the call (most bodies are that one message: reading them needs no trip back to the
loop); the rest comes chunk by chunk through a small bounded buffer. Response chunks go
out as the app produces them, one at a time, so a slow client slows the app instead of
filling memory.

A view that streams a :class:`~llmbridge._web.body.StreamBody`, or answers a whole
:class:`~llmbridge._web.body.WholeBody`, can give its thread back: the adapter offers
``environ[ASYNC_BODY_KEY]``, and when the app returns what that callable made, the
worker thread is released and the body is awaited and pumped on the event loop. A
client disconnect closes the body, which cancels the engine job and ends the pump. The
iterable's ``close()`` is called exactly once whatever happens.

Known differences from ``asgiref.wsgi.WsgiToAsgi`` and ``a2wsgi.WSGIMiddleware``: their
own ``tests/test_wsgi.py`` run against this class in ``.ci/adapter_upstream.sh``, and
these are the tests that fail there (docs/howto/deploy.md says the same):

- an empty chunk from the app is not sent as a message;
- a one-chunk body (a list of one ``bytes``) gets a ``Content-Length``;
- too many duplicates of one request header is a 431 problem+json (asgiref: 400 text);
- ``start_response(..., exc_info)`` before any byte sends the app's error response
  (PEP 3333), where a2wsgi re-raises;
- ``wsgi.errors`` is stderr (a2wsgi: stdout) and ``wsgi.input_terminated`` is set;
- ``script_name`` / ``$SCRIPT_NAME`` also strips the prefix from ``PATH_INFO`` when the
  path starts with it (gunicorn's rule); a2wsgi keeps it there.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio

from ..._exceptions import LLMBridgeError
from ..body import ASYNC_BODY_KEY, StreamBody
from ..drain import Drain, as_hooks, call_hook, engines_of
from .environ import DEFAULT_DUPLICATE_HEADER_LIMIT, build_environ, mount_prefix
from .input import LoopPortal, WSGIInput, pump_input
from .response import AsyncBody, ClientDisconnected, Exchange, send_problem

__all__ = ["WSGIMiddleware", "to_asgi"]

logger = logging.getLogger("llmbridge.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
StartResponse = Callable[..., Callable[[bytes], None]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class WSGIMiddleware:
    """Serve a WSGI app (Flask, or any PEP 3333 app) from an ASGI 3 server.

    A drop-in for ``a2wsgi.WSGIMiddleware`` and ``asgiref.wsgi.WsgiToAsgi``:
    ``app = WSGIMiddleware(flask_app)``, then ``uvicorn module:app`` or
    ``gunicorn -k uvicorn_worker.UvicornWorker module:app``.

    Options (keyword-only):

    - ``workers``: threads for WSGI calls (default 8). A call holds one from the app's
      start to the end of its body, unless it streams through ``ASYNC_BODY_KEY``.
    - ``input_buffer``: request-body chunks buffered ahead of the app (default 4).
    - ``duplicate_header_limit``: how often one request header name may repeat
      (default 100, asgiref's; ``None``: no limit); beyond it the answer is 431.
    - ``script_name``: the mount prefix for a proxy that forwards it (default: the
      ``SCRIPT_NAME`` environment variable, as a2wsgi); ``SCRIPT_NAME`` becomes it and a
      path under it loses it. Behind a proxy that strips the prefix, use the server's
      root path instead (``uvicorn --root-path /api``).
    - ``engines``: engines (or submitters wrapping one) to start at lifespan startup and
      close on shutdown; a Flask app's bridge (``app.extensions["llmbridge"].engines``)
      is asked for its own.
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
        duplicate_header_limit: int | None = DEFAULT_DUPLICATE_HEADER_LIMIT,
        script_name: str | None = None,
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
        if duplicate_header_limit is not None and (
            isinstance(duplicate_header_limit, bool)
            or not isinstance(duplicate_header_limit, int)
            or duplicate_header_limit < 0
        ):
            limit = duplicate_header_limit
            raise ValueError(f"duplicate_header_limit must be an int >= 0 or None, got {limit!r}")
        self.app = app
        self.workers = workers
        self.input_buffer = input_buffer
        self.duplicate_header_limit = duplicate_header_limit
        self.script_name = mount_prefix(
            os.environ.get("SCRIPT_NAME", "") if script_name is None else script_name
        )
        self.handle_signals = handle_signals
        self.drain = Drain(timeout=drain_timeout, retry_after=retry_after)
        self._engines = list(engines)
        self._on_startup = as_hooks(on_startup)
        self._on_shutdown = as_hooks(on_shutdown)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = 0

    def __repr__(self) -> str:
        return f"<WSGIMiddleware {self.app!r} workers={self.workers}>"

    @property
    def engines(self) -> list[Any]:
        """The engines this adapter starts and closes: the given ones, then the app's
        bridge's (see :func:`~llmbridge._web.drain.engines_of`)."""
        return engines_of(*self._engines, self.app)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The bounded pool WSGI calls run on (``workers`` threads, started as needed).

        Made lazily in the process that serves: a pool made before gunicorn forks would
        have no threads in the worker."""
        pid = os.getpid()
        if self._executor is None or self._executor_pid != pid:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="llmbridge-wsgi")
            self._executor_pid = pid
        return self._executor

    async def _run_in_pool(self, environ: dict[str, Any], exchange: Exchange) -> AsyncBody | None:
        # One hop to the pool and one back per request, with no per-call limiter or
        # cancel scope: measured, anyio.to_thread.run_sync's bookkeeping was most of the
        # adapter's own cost per request (benchmarks/streams.py, CPU ms/req).
        context = contextvars.copy_context()
        future = asyncio.get_running_loop().run_in_executor(
            self.executor, context.run, self._call_in_worker, environ, exchange
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The WSGI call can't be interrupted: wait for it (as anyio does unless told
            # to abandon the thread), so it never outlives its request's state.
            await asyncio.wait((future,))
            raise

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
        if not self.drain.bound:
            self.drain.bind(asyncio.get_running_loop(), lambda: self.engines)
        try:
            await self.drain.run()
        finally:
            self.drain.restore_signal_handlers()
        for hook in self._on_shutdown:
            await call_hook(hook)
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)  # idle threads exit; a stuck call can't be killed

    # -- requests ---------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.drain.admitting:
            await send_problem(send, self.drain.refusal())
            return
        portal = LoopPortal()
        exchange = Exchange(send, portal, self.drain.track, self.drain.untrack)
        try:
            environ = build_environ(
                scope,
                None,
                script_name=self.script_name,
                duplicate_header_limit=self.duplicate_header_limit,
            )
        except LLMBridgeError as error:  # too many headers: the app never sees it
            await send_problem(send, error)
            return
        # The first body message (a GET's empty one, most POSTs' whole body) is already
        # here: hand it to wsgi.input directly. The app's reads then need no round trip
        # to a loop that thousands of streams keep busy (it held pool threads for /v1).
        message = await receive()
        if message["type"] != "http.request":
            return  # the client left before the app started: nobody to answer
        complete = not message.get("more_body", False)
        chunks_in, chunks_out = anyio.create_memory_object_stream[bytes](self.input_buffer)
        environ["wsgi.input"] = WSGIInput(
            chunks_out, portal, first=message.get("body", b""), complete=complete
        )
        environ[ASYNC_BODY_KEY] = exchange.async_body
        failure: BaseException | None = None
        self.drain.enter()
        # A plain task, not an anyio task group: per request, anyio's group and cancel
        # scopes were a measurable share of the loop's time at thousands of streams.
        watcher = asyncio.ensure_future(
            pump_input(receive, chunks_in, exchange.set_disconnected, body_done=complete)
        )
        try:
            handle: AsyncBody | None = None
            try:
                handle = await self._run_in_pool(environ, exchange)
            except ClientDisconnected:
                pass
            except Exception as exc:
                failure = exc
            # The app can't read its body any more: drop the rest, so a disconnect is seen.
            chunks_out.close()
            if handle is not None:
                try:
                    await self._pump(handle, exchange)
                except Exception as exc:
                    failure = exc
        finally:
            self.drain.leave()
            chunks_in.close()
            chunks_out.close()
            watcher.cancel()
            try:
                await watcher  # re-raises what receive() raised, if anything
            except asyncio.CancelledError:
                pass
        if failure is None:
            return
        if exchange.headers_sent or exchange.disconnected:
            raise failure  # the response is under way: the server must abort it
        await send_problem(send, failure)
        if not isinstance(failure, LLMBridgeError):
            # The client got its JSON 500; the server logs the crash, as for any ASGI app
            # (and test transports that re-raise app errors see it).
            raise failure

    def _call_in_worker(self, environ: dict[str, Any], exchange: Exchange) -> AsyncBody | None:
        # Code in a WSGI app that calls anyio.from_thread.run() (it worked when the pool
        # was anyio's) finds the loop as in an anyio worker thread.
        threadlocals = _anyio_threadlocals()
        if threadlocals is None:
            return self._call(environ, exchange)
        threadlocals.current_token = exchange.portal.token
        try:
            return self._call(environ, exchange)
        finally:
            del threadlocals.current_token

    def _call(self, environ: dict[str, Any], exchange: Exchange) -> AsyncBody | None:
        """The WSGI call, on a worker thread: app, iteration, close()."""
        iterable = self.app(environ, exchange.start_response)
        if isinstance(iterable, AsyncBody) and iterable.exchange is exchange:
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
                        exchange.set_single_length(len(chunk))
                    exchange.send_from_thread(chunk, more_body=True)
                if exchange.complete:
                    break  # all the declared bytes are out: stop iterating (PEP 3333)
            if exchange.status is None:
                raise RuntimeError("the app returned without calling start_response()")
            if single and not exchange.headers_sent:
                exchange.set_single_length(0)
            exchange.send_from_thread(b"", more_body=False)
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()
        return None

    async def _pump(self, handle: AsyncBody, exchange: Exchange) -> None:
        """Send a handed-over body from the loop; its thread went back to the pool.

        A client disconnect closes the body (:meth:`Exchange.set_disconnected`), which
        cancels the job and ends the wait for its answer or next text with ``Cancelled``."""
        body = handle.body
        exchange.body = body
        try:
            if exchange.status is None:
                raise RuntimeError("the app returned its body without calling start_response()")
            if exchange.disconnected:
                return
            # A view hands its body over before any output: a whole answer, or an error
            # before the first text, is sent as its own reply with its own status (in the
            # body's shape: problem+json, OpenAI's error under /v1), not a broken 200.
            reply = await body.opening()
            if reply is not None:
                if not exchange.client_gone():
                    await exchange.send_reply(reply)
                return
            assert isinstance(body, StreamBody)
            chunks = body.__aiter__()
            try:
                async for chunk in chunks:
                    await exchange.send_body(chunk, True)
            except LLMBridgeError:
                if exchange.client_gone():
                    return  # the Cancelled of our own close(): nobody to tell
                raise
            finally:
                # StreamBody's generator ends without awaiting: this can't be cut short.
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
            await exchange.send_body(b"", False)
        except ClientDisconnected:
            pass
        finally:
            exchange.body = None
            handle.close()


def _anyio_threadlocals() -> Any:
    # anyio keeps a worker thread's loop token here (not a public name): if a later
    # anyio moves it, from_thread calls in apps fail as in any plain thread, nothing else.
    from anyio._core import _eventloop

    return getattr(_eventloop, "threadlocals", None)


def to_asgi(app: WSGIApp, **options: Any) -> WSGIMiddleware:
    """``WSGIMiddleware(app, **options)``: see it for the options."""
    return WSGIMiddleware(app, **options)
