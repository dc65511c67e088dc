"""Quart integration: :class:`QuartBridge`, the Flask bridge's API natively async.

::

    from quart import Quart
    from llmbridge.quart import QuartBridge
    from llmbridge.testing import simulated_engine

    app = Quart(__name__)
    bridge = QuartBridge(app, engine=simulated_engine())

    @app.post("/complete")
    async def complete():
        return {"text": await bridge.generate("Hello")}

    @app.get("/stream")
    async def stream():
        return await bridge.sse("Hello")

Each app's engine starts with its ``before_serving`` and closes with ``after_serving``. On
SIGTERM the bridge stops admitting (503 problem+json with ``Retry-After``), lets open
streams run up to ``drain_timeout`` and then ends them with a final ``event: error``,
before the server's own graceful timeout. Streams are exempt from ``RESPONSE_TIMEOUT``;
a client disconnect cancels the job. The engine is optional: ``QuartBridge(app)``
offloads without one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from typing import Any, ClassVar, ParamSpec, TypeVar, overload

try:
    import quart
    from quart import Quart, Response
except ImportError:  # pragma: no cover - exercised without quart installed
    raise ImportError('llmbridge.quart needs Quart: pip install "llmbridge[quart]"') from None


from ._core.engine import Submitter
from ._core.stream import Stream
from ._exceptions import LLMBridgeError
from ._runtime.offload import DEFAULT, Offloaded, ProcessOffloaded, TimeoutArg
from ._web.body import BodyFormat
from ._web.bridge import SETTINGS, AppState, Bridge, problem_parts
from ._web.drain import Drain, find_engines
from ._web.health import health_paths

__all__ = ["QuartBridge", "StartingStream", "problem_response"]

P = ParamSpec("P")
T = TypeVar("T")


def problem_response(error: LLMBridgeError, request_id: str | None = None) -> Response:
    """The ``application/problem+json`` response for ``error``, with the request id in
    its body and ``X-Request-Id``, and ``Retry-After`` when it has ``retry_after``. Logs
    what the body hides; never raises. The bridge answers
    :class:`~llmbridge.LLMBridgeError` with it."""
    return Response(*problem_parts(quart, error, request_id))


class _AsyncOffloaded(Offloaded[P, T]):
    """``await fn(...)`` runs ``fn`` in the bridge's thread pool."""

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:  # type: ignore[override]
        return await self.acall(*args, **kwargs)


class _AsyncProcessOffloaded(ProcessOffloaded[P, T]):
    """``await fn(...)`` runs ``fn`` in a worker process (pickled by name)."""

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:  # type: ignore[override]
        return await self.acall(*args, **kwargs)


class StartingStream:
    """What :meth:`QuartBridge.stream` returns: ``await`` it for a started
    :class:`~llmbridge.Stream`, or ``async for`` over it directly for ``str`` chunks.

    Either way the first output is awaited first, so errors before any text
    (``Overloaded``, ``RateLimited``) raise where the view can still answer them.
    """

    def __init__(self, start: Callable[[], Awaitable[Stream]]) -> None:
        self._start = start

    def __await__(self) -> Generator[Any, None, Stream]:
        return self._start().__await__()

    async def __aiter__(self) -> AsyncIterator[str]:
        stream = await self._start()
        async with stream:
            async for chunk in stream:
                yield chunk


class QuartBridge(Bridge):
    """The Quart extension: submit to an engine from async views, answer with text or SSE.

    ``engine`` is any :class:`~llmbridge.Submitter`, or ``None`` for offloading only.
    Options (keyword or ``LLMBRIDGE_*`` config, keywords win): ``heartbeat`` (15 s),
    ``start_timeout`` (60 s), ``timeout`` (for :meth:`generate`), ``max_threads`` /
    ``max_processes`` / ``offload_timeout`` (the offload pools), ``drain_timeout`` (10 s;
    keep it under the server's graceful timeout), ``retry_after`` (5 s, sent with 503
    while draining), ``handle_signals`` (True: start draining on SIGTERM/SIGINT, before
    the server waits for connections); and, as for :class:`~llmbridge.flask.FlaskBridge`,
    ``priority_levels`` (read ``X-Priority``), the probes ``health``,
    ``health_prefix``, ``liveness_path``, ``readiness_path``, ``stuck_after`` and
    ``warmup`` (they still answer while draining: ready says no, live yes),
    ``metrics_path`` (``None``; ``"/metrics"``: serve the ``llmbridge:`` metrics there)
    and ``tracing`` (False: a span per request, with the ``otel`` extra).

    Install it on one app or several (``init_app``, each with its own engine);
    ``app.extensions["llmbridge"]`` is the bridge. Every coroutine runs on the app's loop
    and never blocks it; cancelling one (a client disconnect) cancels its job.
    """

    _owner = "QuartBridge"
    _web: ClassVar[Any] = quart
    _settings_table: ClassVar[Mapping[str, tuple[str, Any]]] = {
        **SETTINGS,
        "drain_timeout": ("LLMBRIDGE_DRAIN_TIMEOUT", 10.0),
        "retry_after": ("LLMBRIDGE_RETRY_AFTER", 5.0),
        "handle_signals": ("LLMBRIDGE_HANDLE_SIGNALS", True),
    }

    def __init__(
        self, app: Quart | None = None, *, engine: Submitter | None = None, **options: Any
    ) -> None:
        super().__init__(app, engine=engine, **options)

    def _handler(self) -> Callable[[LLMBridgeError], Awaitable[Response]]:
        async def handle(error: LLMBridgeError) -> Response:
            return self._problem_response(error)  # type: ignore[no-any-return]

        return handle

    def _metrics_view(
        self, render: Callable[[], tuple[bytes, str]]
    ) -> Callable[[], Awaitable[Response]]:
        async def metrics() -> Response:
            import anyio.to_thread

            # Multiprocess mode reads a file per worker: not on the loop.
            body, content_type = await anyio.to_thread.run_sync(render)
            return Response(body, content_type=content_type)

        return metrics

    def _install(self, app: Any, state: AppState) -> None:
        settings = state.settings
        drain = state.extra = Drain(
            timeout=settings["drain_timeout"], retry_after=settings["retry_after"]
        )

        async def before_serving() -> None:
            drain.bind(asyncio.get_running_loop(), lambda: find_engines(state.engine))
            for engine in find_engines(state.engine):
                engine.start()
            if settings["handle_signals"]:
                drain.install_signal_handlers()

        async def after_serving() -> None:
            try:
                await drain.run()
            finally:
                drain.restore_signal_handlers()

        probes = health_paths(settings) if settings["health"] else ()

        async def admit() -> Response | None:
            # The probes answer while draining: ready says no, live still says yes.
            if not drain.admitting and quart.request.path not in probes:
                return self._problem_response(drain.refusal())  # type: ignore[no-any-return]
            return None

        async def tag(response: Response) -> Response:
            return self._tag(response)  # type: ignore[no-any-return]

        app.before_serving(before_serving)
        app.after_serving(after_serving)
        app.before_request(admit)
        app.after_request(tag)

    def _health_view(
        self,
        answer: Callable[[Callable[[], tuple[int, dict[str, Any]]]], Any],
        probe: Callable[[], tuple[int, dict[str, Any]]],
    ) -> Callable[[], Any]:
        async def view() -> Any:
            return answer(probe)

        return view

    def _draining(self, state: AppState) -> bool:
        drain = state.extra
        return isinstance(drain, Drain) and not drain.admitting

    @property
    def drain(self) -> Drain:
        """The current app's (or the only app's) shutdown state."""
        drain: Drain = self._state().extra
        return drain

    # -- generation -------------------------------------------------------------------

    async def generate(self, prompt: str, /, **params: Any) -> str:
        """The whole completion text, awaited without blocking the loop.

        Raises the request's :class:`~llmbridge.LLMBridgeError`, or
        :class:`~llmbridge.Timeout` after the ``timeout`` option (the job is cancelled).
        Cancelling the awaiting task (a client disconnect) cancels the job.
        """
        return await self._agenerate(prompt, params)

    def stream(self, prompt: str | Stream, /, **params: Any) -> StartingStream:
        """The completion as it is produced: ``async for chunk in bridge.stream(...)``,
        or ``stream = await bridge.stream(...)`` for the started
        :class:`~llmbridge.Stream`.

        The first output is awaited before anything is yielded, so errors before any text
        raise here; :class:`~llmbridge.Timeout` after ``start_timeout``. Leaving the loop
        early or a disconnect cancels the job.
        """
        return StartingStream(lambda: self._astarted(prompt, params))

    async def sse(self, prompt: str | Stream, /, **params: Any) -> Response:
        """A ``text/event-stream`` response streaming the completion.

        The same events as the Flask bridge (``data: {"text": ...}``, heartbeats, a final
        ``event: done`` or ``event: error``). Awaits the first output first, so early
        failures are problem responses. Exempt from ``RESPONSE_TIMEOUT``; a disconnect
        cancels the job.
        """
        return self._response(await self._astarted(prompt, params), "sse")

    async def stream_response(self, prompt: str | Stream, /, **params: Any) -> Response:
        """A ``text/plain`` response streaming the raw completion (see :meth:`sse`; an
        error mid-stream drops the connection)."""
        return self._response(await self._astarted(prompt, params), "text")

    def _response(self, stream: Stream, format: BodyFormat) -> Response:
        body = self._body(stream, format)
        response = Response(
            self.drain.pump(body),
            content_type=body.media_type,
            headers=self._stream_headers(stream),
        )
        response.timeout = None  # a stream lasts as long as it lasts: no RESPONSE_TIMEOUT
        return response

    # -- offload ----------------------------------------------------------------------

    # The call form comes first: ``await bridge.to_thread(fn, ...)`` is how Quart views
    # offload; ``@bridge.to_thread(timeout=5)`` is the decorator.

    @overload
    def to_thread(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> Awaitable[T]: ...

    @overload
    def to_thread(
        self, fn: None = None, /, *, timeout: TimeoutArg = DEFAULT
    ) -> Callable[[Callable[P, T]], _AsyncOffloaded[P, T]]: ...

    def to_thread(
        self, fn: Any = None, /, *args: Any, timeout: TimeoutArg = DEFAULT, **kw: Any
    ) -> Any:
        """``await bridge.to_thread(fn, *args)``: run a blocking call in the bounded thread
        pool without blocking the loop.

        ``timeout`` (default: ``offload_timeout``) raises :class:`~llmbridge.Timeout`
        (504); the timed-out thread keeps its pool slot until it returns. As a decorator,
        ``@bridge.to_thread(timeout=5)`` makes ``await fn(...)`` do the same.
        """
        if fn is None:
            return lambda fn: _AsyncOffloaded(self.offloader, fn, timeout)
        return self._ato_thread(fn, *args, timeout=timeout, **kw)

    @overload
    def to_process(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> Awaitable[T]: ...

    @overload
    def to_process(
        self, fn: None = None, /, *, timeout: TimeoutArg = DEFAULT
    ) -> Callable[[Callable[P, T]], _AsyncProcessOffloaded[P, T]]: ...

    def to_process(
        self, fn: Any = None, /, *args: Any, timeout: TimeoutArg = DEFAULT, **kw: Any
    ) -> Any:
        """``await bridge.to_process(fn, *args)``: run a call that holds the GIL in a
        worker process. ``fn``, arguments and result must pickle; ``timeout`` raises
        :class:`~llmbridge.Timeout` and kills the worker. As a decorator (module-level
        functions only): ``@bridge.to_process(timeout=5)``.
        """
        if fn is None:
            return lambda fn: _AsyncProcessOffloaded(self.offloader, fn, timeout)
        return self._ato_process(fn, *args, timeout=timeout, **kw)
