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

Installing the bridge adds exactly two things to an app: an error handler that answers
every :class:`~llmbridge.LLMBridgeError` with ``application/problem+json``, and (unless
``LLMBRIDGE_ASYNC_VIEWS`` is false) ``async def`` views and hooks running on the
process's one background event loop instead of a new loop per call.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar, overload

try:
    from flask import Flask, Response, current_app, has_app_context, has_request_context, request
except ImportError:  # pragma: no cover - exercised without flask installed
    raise ImportError('llmbridge.flask needs Flask: pip install "llmbridge[flask]"') from None


from ._core.engine import Submitter
from ._core.stream import Stream
from ._exceptions import LLMBridgeError
from ._runtime.flask_async import loop_async_to_sync
from ._runtime.offload import DEFAULT, Offloaded, Offloader, ProcessOffloaded, TimeoutArg
from ._sansio.options import check_bridge_options
from ._sansio.problem import problem, problem_headers
from ._web.body import ASYNC_BODY_KEY, BodyFormat, StreamBody

__all__ = ["FlaskBridge", "problem_response"]

P = ParamSpec("P")
T = TypeVar("T")

#: Option name -> (config key, default). Keyword options win over app.config.
_SETTINGS: dict[str, tuple[str, Any]] = {
    "heartbeat": ("LLMBRIDGE_HEARTBEAT", 15.0),
    "start_timeout": ("LLMBRIDGE_START_TIMEOUT", 60.0),
    "timeout": ("LLMBRIDGE_TIMEOUT", None),
    "async_views": ("LLMBRIDGE_ASYNC_VIEWS", True),
    "max_threads": ("LLMBRIDGE_MAX_THREADS", 40),
    "max_processes": ("LLMBRIDGE_MAX_PROCESSES", None),
    "offload_timeout": ("LLMBRIDGE_OFFLOAD_TIMEOUT", None),
}


def _check_options(options: dict[str, Any]) -> None:
    check_bridge_options("FlaskBridge", options, _SETTINGS)


def problem_response(error: LLMBridgeError) -> Response:
    """The ``application/problem+json`` response for ``error``: its status, an RFC 9457
    body (:func:`llmbridge._body.problem`) and ``Retry-After`` when it has
    ``retry_after``. The bridge registers it as the app's handler for
    :class:`~llmbridge.LLMBridgeError`; never raises."""
    headers = problem_headers(error)
    return Response(
        json.dumps(problem(error)),
        status=error.status,
        content_type=headers.pop("Content-Type"),
        headers=headers,
    )


class _AppState:
    __slots__ = ("engine", "settings")

    def __init__(self, engine: Submitter, settings: dict[str, Any]) -> None:
        self.engine = engine
        self.settings = settings


class FlaskBridge:
    """The Flask extension: submit to an engine from views, answer with text or SSE.

    ``engine`` is any :class:`~llmbridge.Submitter` (an :class:`~llmbridge.Engine`, or
    one wrapped in policies). Options (keyword or ``LLMBRIDGE_*`` config, keywords win):

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
    ========================  ===========================  ==================================

    Follows Flask's extension pattern: ``FlaskBridge(app, ...)`` or ``init_app(app)``
    later; the bridge is ``app.extensions["llmbridge"]``; methods use the engine of
    ``current_app`` (or of the only app, outside an app context). One bridge may serve
    several apps; the offload pools belong to the bridge and take their sizes from the
    first app. Every method is thread-safe.
    """

    def __init__(
        self, app: Flask | None = None, *, engine: Submitter | None = None, **options: Any
    ) -> None:
        _check_options(options)
        self._engine = engine
        self._options = options
        self._apps: weakref.WeakKeyDictionary[Flask, _AppState] = weakref.WeakKeyDictionary()
        self._offloader: Offloader | None = None
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<FlaskBridge apps={len(self._apps)}>"

    def init_app(self, app: Flask, *, engine: Submitter | None = None, **options: Any) -> None:
        """Install the bridge on ``app``. Call it before the app serves requests.

        Raises ``TypeError`` if no engine was given (here or to the constructor) or an
        option is unknown, ``ValueError`` for a bad option value.
        """
        _check_options(options)
        engine = engine if engine is not None else self._engine
        if engine is None:
            raise TypeError("FlaskBridge needs an engine: FlaskBridge(app, engine=...)")
        if not callable(getattr(engine, "submit", None)):
            raise TypeError(f"engine must have a submit() method, got {type(engine).__name__}")
        given = {**self._options, **options}
        settings: dict[str, Any] = {}
        for name, (key, default) in _SETTINGS.items():
            settings[name] = given[name] if name in given else app.config.get(key, default)
            app.config.setdefault(key, settings[name])
        _check_options(settings)
        self._apps[app] = _AppState(engine, settings)
        app.extensions["llmbridge"] = self
        if self._offloader is None:
            self._offloader = Offloader(
                max_threads=settings["max_threads"],
                max_processes=settings["max_processes"],
                timeout=settings["offload_timeout"],
            )
        elif len(self._apps) == 1:
            # Decorators made at import time hold the offloader already; its pools are
            # sized when first used, so the first app's settings still apply.
            self._offloader.configure(
                max_threads=settings["max_threads"],
                max_processes=settings["max_processes"],
                timeout=settings["offload_timeout"],
            )
        # Only add our handler: an app that already handles LLMBridgeError keeps its own.
        if LLMBridgeError not in app.error_handler_spec[None][None]:
            app.register_error_handler(LLMBridgeError, problem_response)
        if settings["async_views"]:
            # Flask's documented hook for how async views run (an instance attribute
            # shadows App.async_to_sync for this app only).
            app.async_to_sync = loop_async_to_sync  # type: ignore[method-assign]

    # -- state ------------------------------------------------------------------------

    def _state(self) -> _AppState:
        if has_app_context():
            app = current_app._get_current_object()  # type: ignore[attr-defined]
            state = self._apps.get(app)
            if state is None:
                raise RuntimeError("this FlaskBridge is not installed on the current app")
            return state
        states = list(self._apps.values())
        if len(states) == 1:
            return states[0]
        raise RuntimeError(
            "working outside of an application context with a FlaskBridge installed on "
            f"{len(states)} apps: use `with app.app_context():`"
        )

    @property
    def engines(self) -> list[Submitter]:
        """The engine of every app this bridge is installed on (for servers' lifespans)."""
        return [state.engine for state in list(self._apps.values())]

    @property
    def engine(self) -> Submitter:
        """The engine of the current app (or of the only app)."""
        return self._state().engine

    @property
    def offloader(self) -> Offloader:
        """The bridge's thread and process pools (created by :meth:`init_app`)."""
        if self._offloader is None:
            self._offloader = Offloader(
                max_threads=self._options.get("max_threads", 40),
                max_processes=self._options.get("max_processes"),
                timeout=self._options.get("offload_timeout"),
            )
        return self._offloader

    def start(self) -> None:
        """Start every app's engine now (if it has ``start()``), not on first request."""
        for state in list(self._apps.values()):
            start = getattr(state.engine, "start", None)
            if callable(start):
                start()

    def close(self) -> None:
        """Close every app's engine (if it has ``close()``). Blocks until they stop."""
        for state in list(self._apps.values()):
            close = getattr(state.engine, "close", None)
            if callable(close):
                close()

    # -- generation -------------------------------------------------------------------

    def submit(self, prompt: str, /, **params: Any) -> Stream:
        """Submit to the current app's engine; the raw :class:`~llmbridge.Stream`.

        Never blocks; raises the engine's admission errors (``Overloaded``, ...).
        """
        return self._state().engine.submit(prompt, **params)

    def generate(self, prompt: str, /, **params: Any) -> str:
        """The whole completion text. Blocks the calling thread until it is done.

        Raises the request's :class:`~llmbridge.LLMBridgeError` (the bridge's handler
        turns it into a problem response), :class:`~llmbridge.Timeout` after the
        ``timeout`` option (the job is cancelled). Don't call it on an event loop: use
        :meth:`agenerate` in ``async def`` views.
        """
        state = self._state()
        stream = state.engine.submit(prompt, **params)
        return stream.result(state.settings["timeout"]).text

    async def agenerate(self, prompt: str, /, **params: Any) -> str:
        """The async twin of :meth:`generate`, for ``async def`` views: never blocks the
        loop; cancelling the awaiting task cancels the job."""
        state = self._state()
        stream = state.engine.submit(prompt, **params)
        return (await stream.aresult(state.settings["timeout"])).text

    def stream(self, prompt: str | Stream, /, **params: Any) -> Stream:
        """A started stream: iterate it for ``str`` chunks (``for`` or ``async for``).

        Blocks until the first output, so errors that happen before any text
        (``Overloaded``, ``RateLimited``, a failing backend) raise here and become a
        problem response instead of a broken 200; :class:`~llmbridge.Timeout` after
        ``start_timeout``. Closing the stream (or dropping it) cancels the job. Pass a
        :class:`~llmbridge.Stream` you submitted yourself to start it the same way.
        """
        return self._started(self._submit(prompt, params))

    def _started(self, stream: Stream) -> Stream:
        timeout = self._state().settings["start_timeout"]
        try:
            stream.wait_started(timeout)
        except BaseException:
            stream.cancel()
            raise
        return stream

    async def astream(self, prompt: str | Stream, /, **params: Any) -> Stream:
        """The async twin of :meth:`stream`: waits for the first output without blocking
        the loop."""
        stream = self._submit(prompt, params)
        try:
            await stream.await_started(self._state().settings["start_timeout"])
        except BaseException:
            stream.cancel()
            raise
        return stream

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
        return self._response(await self.astream(prompt, **params), "sse")

    def stream_response(self, prompt: str | Stream, /, **params: Any) -> Response:
        """A ``text/plain`` response streaming the raw completion text (see :meth:`sse`
        for when it blocks and how it ends; an error mid-stream drops the connection)."""
        return self._stream_response(prompt, params, "text")

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

    async def astream_response(self, prompt: str | Stream, /, **params: Any) -> Response:
        """The async twin of :meth:`stream_response`."""
        return self._response(await self.astream(prompt, **params), "text")

    def _submit(self, prompt: str | Stream, params: dict[str, Any]) -> Stream:
        if isinstance(prompt, Stream):
            if params:
                raise TypeError("parameters go to submit(), not with an already submitted stream")
            return prompt
        return self._state().engine.submit(prompt, **params)

    def _response(self, stream: Stream, format: BodyFormat) -> Response:
        settings = self._state().settings
        body = StreamBody(
            stream,
            format=format,
            heartbeat=settings["heartbeat"],
            start_timeout=settings["start_timeout"],
        )
        headers = {
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: don't buffer the stream
            "X-LLMBridge-Request-Id": stream.id,
        }
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
        return await self.offloader.arun_in_thread(fn, *args, timeout=timeout, **kwargs)

    async def ato_process(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        """The async twin of :meth:`to_process`, for ``async def`` views."""
        return await self.offloader.arun_in_process(fn, *args, timeout=timeout, **kwargs)
