"""Flask integration: :class:`FlaskBridge`, a Flask extension over any llmbridge engine.

::

    from flask import Flask
    from llmbridge.flask import FlaskBridge
    from llmbridge.testing import simulated_engine

    app = Flask(__name__)
    bridge = FlaskBridge(app, engine=simulated_engine())

    @app.post("/complete")
    def complete():
        return {"text": bridge.generate("Hello")}

    @app.get("/stream")
    def stream():
        return bridge.sse("Hello")

Installing the bridge adds four things to an app: the ``/livez`` and ``/readyz`` probes
(:mod:`llmbridge._web.health`; ``health=False`` leaves them out), an error handler that
answers every :class:`~llmbridge.LLMBridgeError` with ``application/problem+json``, an
``after_request`` hook that puts the request id in ``X-Request-Id`` on responses of views
that used the bridge, and (unless ``LLMBRIDGE_ASYNC_VIEWS`` is false) ``async def`` views and hooks
running on the process's one background event loop instead of a new loop per call.
The engine is optional: ``FlaskBridge(app)`` offloads and runs async views without one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, ParamSpec, TypeVar, overload

try:
    import flask
    from flask import Flask, Response, has_request_context, request
except ImportError:  # pragma: no cover - exercised without flask installed
    raise ImportError('llmbridge.flask needs Flask: pip install "llmbridge[flask]"') from None


from ._core.engine import Submitter
from ._core.stream import Stream
from ._exceptions import LLMBridgeError
from ._runtime.flask_async import loop_async_to_sync
from ._runtime.offload import DEFAULT, Offloaded, ProcessOffloaded, TimeoutArg
from ._web.body import ASYNC_BODY_KEY, BodyFormat, StreamBody
from ._web.bridge import SETTINGS, AppState, Bridge, problem_parts

__all__ = ["FlaskBridge", "problem_response"]

P = ParamSpec("P")
T = TypeVar("T")


def problem_response(error: LLMBridgeError, request_id: str | None = None) -> Response:
    """The ``application/problem+json`` response for ``error``: its status, an RFC 9457
    body with the request id (``request_id``, else the current request's), its
    ``Retry-After`` and ``X-Request-Id``. Logs what the body hides. Never raises; the
    bridge registers it for :class:`~llmbridge.LLMBridgeError`."""
    return Response(*problem_parts(flask, error, request_id))


class FlaskBridge(Bridge):
    """The Flask extension: submit to an engine from views, answer with text or SSE.

    ``engine`` is any :class:`~llmbridge.Submitter` (an :class:`~llmbridge.Engine`, or
    one wrapped in policies), or ``None`` for offloading and async views only. Options
    (keyword or ``LLMBRIDGE_*`` config, keywords win):

    ========================  ===========================  ==================================
    option                    config key                   meaning
    ========================  ===========================  ==================================
    ``heartbeat``             ``LLMBRIDGE_HEARTBEAT``      SSE comment after this many idle
                                                           seconds (15; ``None``: never)
    ``start_timeout``         ``LLMBRIDGE_START_TIMEOUT``  wait this long for the first
                                                           output before answering 504 (60)
    ``timeout``               ``LLMBRIDGE_TIMEOUT``        :meth:`generate`'s total deadline
    ``async_views``           ``LLMBRIDGE_ASYNC_VIEWS``    run async views on the bridge's
                                                           loop (True)
    ``max_threads``           ``LLMBRIDGE_MAX_THREADS``    :meth:`to_thread` pool size (40)
    ``max_processes``         ``LLMBRIDGE_MAX_PROCESSES``  :meth:`to_process` pool (CPUs)
    ``offload_timeout``       ``LLMBRIDGE_OFFLOAD_TIMEOUT``  default offload deadline
    ``priority_levels``       ``LLMBRIDGE_PRIORITY_LEVELS``  read ``X-Priority`` (0 to N-1)
                                                           as the request's ``priority``
                                                           (``None``: ignore the header)
    ``health``                ``LLMBRIDGE_HEALTH``         install ``/livez`` and
                                                           ``/readyz`` (True)
    ``health_prefix``         ``LLMBRIDGE_HEALTH_PREFIX``  path prefix of both probes ("")
    ``liveness_path``         ``LLMBRIDGE_LIVENESS_PATH``  ("/livez")
    ``readiness_path``        ``LLMBRIDGE_READINESS_PATH``  ("/readyz")
    ``stuck_after``           ``LLMBRIDGE_STUCK_AFTER``    a step longer than this is not
                                                           live (30 s)
    ``warmup``                ``LLMBRIDGE_WARMUP``         a prompt to finish once before
                                                           ready (``None``)
    ``metrics_path``          ``LLMBRIDGE_METRICS_PATH``   serve the ``llmbridge:`` metrics
                                                           here, e.g. ``"/metrics"`` (None:
                                                           off; needs ``[metrics]``)
    ``tracing``               ``LLMBRIDGE_TRACING``        a span per request (False;
                                                           needs ``[otel]``)
    ========================  ===========================  ==================================

    Follows Flask's extension pattern: ``FlaskBridge(app, ...)`` or ``init_app(app)``
    later, once per app (each app may have its own engine); the bridge is
    ``app.extensions["llmbridge"]``; methods use the engine of ``current_app`` (or of the
    only app, outside an app context). The offload pools belong to the bridge and take
    their sizes from the first app. Every method is thread-safe.
    """

    _owner = "FlaskBridge"
    _web: ClassVar[Any] = flask
    _settings_table: ClassVar[Mapping[str, tuple[str, Any]]] = {
        **SETTINGS,
        "async_views": ("LLMBRIDGE_ASYNC_VIEWS", True),
    }

    def __init__(
        self, app: Flask | None = None, *, engine: Submitter | None = None, **options: Any
    ) -> None:
        super().__init__(app, engine=engine, **options)

    def _handler(self) -> Callable[[LLMBridgeError], Response]:
        return self._problem_response

    def _metrics_view(self, render: Callable[[], tuple[bytes, str]]) -> Callable[[], Response]:
        def metrics() -> Response:
            body, content_type = render()
            return Response(body, content_type=content_type)

        return metrics

    def _install(self, app: Any, state: AppState) -> None:
        app.after_request(self._tag)
        if state.settings["async_views"]:
            # Flask's documented hook for how async views run (an instance attribute
            # shadows App.async_to_sync for this app only).
            app.async_to_sync = loop_async_to_sync

    # -- generation -------------------------------------------------------------------

    def generate(self, prompt: str, /, **params: Any) -> str:
        """The whole completion text. Blocks the calling thread until it is done.

        Raises the request's :class:`~llmbridge.LLMBridgeError` (the bridge's handler
        turns it into a problem response), :class:`~llmbridge.Timeout` after the
        ``timeout`` option (the job is cancelled). Don't call it on an event loop: use
        :meth:`agenerate` in ``async def`` views.
        """
        stream = self.submit(prompt, **params)
        return stream.result(self._state().settings["timeout"]).text

    async def agenerate(self, prompt: str, /, **params: Any) -> str:
        """The async twin of :meth:`generate`, for ``async def`` views: never blocks the
        loop; cancelling the awaiting task cancels the job."""
        return await self._agenerate(prompt, params)

    def stream(self, prompt: str | Stream, /, **params: Any) -> Stream:
        """A started stream: iterate it for ``str`` chunks (``for`` or ``async for``).

        Blocks until the first output, so errors that happen before any text
        (``Overloaded``, ``RateLimited``, a failing backend) raise here and become a
        problem response instead of a broken 200; :class:`~llmbridge.Timeout` after
        ``start_timeout``. Closing the stream (or dropping it) cancels the job. Pass a
        :class:`~llmbridge.Stream` you submitted yourself to start it the same way.
        """
        return self._started(self._submit(prompt, params))

    async def astream(self, prompt: str | Stream, /, **params: Any) -> Stream:
        """The async twin of :meth:`stream`: waits for the first output without blocking
        the loop."""
        return await self._astarted(prompt, params)

    def sse(self, prompt: str | Stream, /, **params: Any) -> Response:
        """A ``text/event-stream`` response streaming the completion.

        Events: ``data: {"text": ...}`` per chunk (JSON, so no text can forge or split
        an event), ``:`` heartbeat comments, a final ``event: done`` with finish reason
        and usage, or ``event: error`` with a problem object. Blocks until the first
        output like :meth:`stream`, so early failures are problem responses. The server
        closing the response (client gone) cancels the job. Under an ASGI adapter that
        offers ``llmbridge.async_body`` (``llmbridge.asgi``), it returns at once: the
        adapter waits for the first output and pumps the body on its loop, holding no
        thread, and still answers early failures with a problem response.
        """
        return self._stream_response(prompt, params, "sse")

    async def asse(self, prompt: str | Stream, /, **params: Any) -> Response:
        """The async twin of :meth:`sse`, for ``async def`` views."""
        return self._response(await self._astarted(prompt, params), "sse")

    def stream_response(self, prompt: str | Stream, /, **params: Any) -> Response:
        """A ``text/plain`` response streaming the raw completion text (see :meth:`sse`
        for when it blocks and how it ends; an error mid-stream drops the connection)."""
        return self._stream_response(prompt, params, "text")

    async def astream_response(self, prompt: str | Stream, /, **params: Any) -> Response:
        """The async twin of :meth:`stream_response`."""
        return self._response(await self._astarted(prompt, params), "text")

    def _stream_response(
        self, prompt: str | Stream, params: dict[str, Any], format: BodyFormat
    ) -> Response:
        stream = self._submit(prompt, params)
        if self._pump() is None:
            stream = self._started(stream)
        # else: the ASGI adapter awaits the first output on its loop and answers an early
        # failure with a problem response itself, so no worker thread waits for it here.
        return self._response(stream, format)

    @staticmethod
    def _pump() -> Callable[[StreamBody], Iterable[bytes]] | None:
        return request.environ.get(ASYNC_BODY_KEY) if has_request_context() else None

    def _response(self, stream: Stream, format: BodyFormat) -> Response:
        body = self._body(stream, format)
        headers = self._stream_headers(stream)
        pump = self._pump()
        if pump is not None:
            return Response(
                pump(body), content_type=body.media_type, headers=headers, direct_passthrough=True
            )
        return Response(body, content_type=body.media_type, headers=headers)

    # -- offload ----------------------------------------------------------------------

    @overload
    def to_thread(
        self, fn: None = None, /, *, timeout: TimeoutArg = DEFAULT
    ) -> Callable[[Callable[P, T]], Offloaded[P, T]]: ...

    @overload
    def to_thread(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T: ...

    def to_thread(
        self,
        fn: Callable[..., T] | None = None,
        /,
        *args: Any,
        timeout: TimeoutArg = DEFAULT,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in the bridge's bounded thread pool; block for it.

        ``fn`` sees Flask's request and app context (a copy of the caller's contextvars).
        ``timeout`` (default: the ``offload_timeout`` option) raises
        :class:`~llmbridge.Timeout`, answered 504; the timed-out thread keeps its pool
        slot until it returns, so stuck calls can't exceed the pool. Without ``fn``,
        a decorator: ``@bridge.to_thread(timeout=5)`` (the parentheses are required).
        """
        if fn is None:
            return self.offloader.thread(timeout=timeout)
        return self.offloader.call_in_thread(fn, *args, timeout=timeout, **kwargs)

    @overload
    def to_process(
        self, fn: None = None, /, *, timeout: TimeoutArg = DEFAULT
    ) -> Callable[[Callable[P, T]], ProcessOffloaded[P, T]]: ...

    @overload
    def to_process(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T: ...

    def to_process(
        self,
        fn: Callable[..., T] | None = None,
        /,
        *args: Any,
        timeout: TimeoutArg = DEFAULT,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in a worker process of the bridge's pool; block.

        For blocking calls that hold the GIL: they stall only their worker process.
        ``fn``, arguments and result must pickle (module-level functions). ``timeout``
        raises :class:`~llmbridge.Timeout` (504) and kills the worker. Without ``fn``, a
        decorator for module-level functions: ``@bridge.to_process(timeout=5)``.
        """
        if fn is None:
            return self.offloader.process(timeout=timeout)
        return self.offloader.call_in_process(fn, *args, timeout=timeout, **kwargs)

    async def ato_thread(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """The async twin of :meth:`to_thread`, for ``async def`` views."""
        return await self._ato_thread(fn, *args, timeout=timeout, **kwargs)

    async def ato_process(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """The async twin of :meth:`to_process`, for ``async def`` views."""
        return await self._ato_process(fn, *args, timeout=timeout, **kwargs)
