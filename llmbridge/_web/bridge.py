"""What the Flask and Quart bridges share: one core under two thin framework layers.

:class:`Bridge` holds everything that does not depend on whether a view blocks a thread
(Flask) or awaits on a loop (Quart): the settings table, one state per app (a bridge
serves several apps), request ids, problem responses, response headers, submission and
the offload pools. :mod:`llmbridge.flask` and :mod:`llmbridge.quart` add only how they
wait and their framework hooks.

Quart mirrors Flask's request API, so the core reaches the framework only through the
names both modules export (``current_app``, ``g``, ``request``, ``has_app_context``,
``has_request_context``, ``Response``): a twin passes its framework's module as ``web``.

Request ids: a client's ``X-Request-Id`` that is 1-128 characters of ``A-Za-z0-9._:-``
becomes the engine request's id (any other value is replaced, never echoed). The response
carries the engine's id in ``X-Request-Id``; problem bodies and the log line of a failed
request carry the same id.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from .._core.engine import Submitter
from .._core.stream import Stream
from .._exceptions import BadRequest, Cancelled, LLMBridgeError
from .._runtime.offload import DEFAULT, Offloader, TimeoutArg
from .._sansio.chat import chat_messages, render_messages
from .._sansio.options import check_bridge_options
from .._sansio.problem import problem, problem_headers, problem_status
from . import reqlog
from .body import BodyFormat, StreamBody
from .health import HEALTH_SETTINGS, Health, check_health_settings, health_paths, health_response
from .reqlog import RECORD_KEY, RequestRecord, current_record

__all__ = [
    "PRIORITY_HEADER",
    "REQUEST_ID_HEADER",
    "SETTINGS",
    "AppState",
    "Bridge",
    "log_answer",
    "problem_parts",
    "valid_request_id",
]

logger = logging.getLogger("llmbridge")

T = TypeVar("T")

#: The header a request id travels in, both ways.
REQUEST_ID_HEADER = "X-Request-Id"

#: The header a client's request priority travels in (read only with ``priority_levels``).
PRIORITY_HEADER = "X-Priority"

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

#: Where the id of the current request is kept, on the framework's ``g``.
_G_KEY = "_llmbridge_request_id"

#: Option name -> (config key, default), for both bridges. Keyword options win over
#: app.config. Each twin adds its own rows.
SETTINGS: dict[str, tuple[str, Any]] = {
    "heartbeat": ("LLMBRIDGE_HEARTBEAT", 15.0),
    "start_timeout": ("LLMBRIDGE_START_TIMEOUT", 60.0),
    "timeout": ("LLMBRIDGE_TIMEOUT", None),
    "max_threads": ("LLMBRIDGE_MAX_THREADS", 40),
    "max_processes": ("LLMBRIDGE_MAX_PROCESSES", None),
    "offload_timeout": ("LLMBRIDGE_OFFLOAD_TIMEOUT", None),
    "metrics_path": ("LLMBRIDGE_METRICS_PATH", None),
    "tracing": ("LLMBRIDGE_TRACING", False),
    "priority_levels": ("LLMBRIDGE_PRIORITY_LEVELS", None),
    **HEALTH_SETTINGS,
}


def valid_request_id(value: str | None) -> str | None:
    """``value`` if it may serve as a request id (1-128 characters of ``A-Za-z0-9._:-``),
    else ``None``. Pure."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return None


def _client_request_id(web: Any) -> str | None:
    if not web.has_request_context():
        return None
    return valid_request_id(web.request.headers.get(REQUEST_ID_HEADER))


def _client_priority(web: Any, levels: int | None) -> int | None:
    """The client's ``X-Priority`` (an int from 0 to ``levels - 1``), when the bridge
    reads it; raises :class:`~llmbridge.BadRequest` for any other value."""
    if levels is None or not web.has_request_context():
        return None
    value = web.request.headers.get(PRIORITY_HEADER)
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 3 and int(text) < levels):
        raise BadRequest(f"{PRIORITY_HEADER} must be an integer from 0 to {levels - 1}")
    return int(text)


def _check_priority_levels(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ValueError(f"priority_levels must be an int >= 2 or None, got {value!r}")


def _remember(web: Any, request_id: str) -> None:
    # The first id wins: it is the one the client sent, or the first engine request's.
    if web.has_app_context() and getattr(web.g, _G_KEY, None) is None:
        setattr(web.g, _G_KEY, request_id)


def _current_request_id(web: Any) -> str:
    """The current request's id: its engine request's, else the client's, else a new one
    (remembered, so the log, the body and the header agree)."""
    known: str | None = getattr(web.g, _G_KEY, None) if web.has_app_context() else None
    if known is None:
        known = _client_request_id(web) or uuid.uuid4().hex
        _remember(web, known)
    return known


def log_answer(error: BaseException, request_id: str) -> None:
    """Log how a request was answered with ``error``, under its id. A non-public error's
    full text (hidden from the client) goes to WARNING, a public one (429, 503, ...) to
    INFO. One line, no traceback: the engine logs a backend's failure where it happens."""
    status = problem_status(error)
    if isinstance(error, LLMBridgeError) and error.public:
        logger.info("request %s answered %s: %s", request_id, status, error.message)
    else:
        logger.warning("request %s answered %s, details hidden: %s", request_id, status, error)


def problem_parts(
    web: Any, error: BaseException, request_id: str | None = None
) -> tuple[bytes, int, dict[str, str]]:
    """Body, status and headers of the problem response for ``error`` in the current
    request (id: ``request_id``, else the current one), and logs it. Never raises."""
    try:
        request_id = request_id or _current_request_id(web)
        log_answer(error, request_id)
        record = current_record(web)
        if record is not None:
            record.error = error
        body = problem(error, request_id)
        headers = problem_headers(error)
        headers[REQUEST_ID_HEADER] = request_id
        return json.dumps(body, default=str).encode(), body["status"], headers
    except Exception:  # a hostile error subclass; the handler itself must not fail
        logger.exception("building the problem response for %r failed", type(error))
        fallback = {"type": "about:blank", "title": "Internal error", "status": 500}
        return json.dumps(fallback).encode(), 500, {"Content-Type": "application/problem+json"}


def _check_engine(engine: Any) -> None:
    if engine is not None and not callable(getattr(engine, "submit", None)):
        raise TypeError(f"engine must have a submit() method, got {type(engine).__name__}")


class AppState:
    """One app's engine and settings (and what a twin keeps per app, in ``extra``)."""

    __slots__ = ("engine", "extra", "settings")

    def __init__(self, engine: Submitter | None, settings: dict[str, Any]) -> None:
        self.engine = engine
        self.settings = settings
        self.extra: Any = None


class Bridge:
    """The framework-free part of :class:`~llmbridge.flask.FlaskBridge` and
    :class:`~llmbridge.quart.QuartBridge`. Not used directly.

    Methods use the state of the current app (or of the only app, outside an app
    context). Thread-safe; async methods never block the loop.
    """

    #: The twin's class name, for messages.
    _owner: ClassVar[str] = "Bridge"
    #: The framework's module (``flask`` or ``quart``).
    _web: ClassVar[Any]
    #: Option name -> (config key, default).
    _settings_table: ClassVar[Mapping[str, tuple[str, Any]]] = SETTINGS

    def __init__(self, app: Any = None, *, engine: Submitter | None = None, **options: Any):
        self._check_options(options)
        _check_engine(engine)
        self._engine = engine
        self._options = options
        self._apps: weakref.WeakKeyDictionary[Any, AppState] = weakref.WeakKeyDictionary()
        self._offloader: Offloader | None = None
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<{self._owner} apps={len(self._apps)}>"

    def _check_options(self, options: Mapping[str, Any]) -> None:
        check_bridge_options(self._owner, options, self._settings_table)
        check_health_settings(options)
        _check_priority_levels(options.get("priority_levels"))

    def init_app(self, app: Any, *, engine: Submitter | None = None, **options: Any) -> None:
        """Install the bridge on ``app``; call it before the app serves requests.

        ``engine`` (default: the constructor's) may be omitted: offloading and the error
        handler work without one, and the methods that need one raise
        :class:`~llmbridge.LLMBridgeError` saying how to pass it. Raises ``TypeError``
        for an unknown option or an engine without ``submit()``, ``ValueError`` for a bad
        option value.
        """
        self._check_options(options)
        _check_engine(engine)
        given = {**self._options, **options}
        settings: dict[str, Any] = {}
        for name, (key, default) in self._settings_table.items():
            settings[name] = given[name] if name in given else app.config.get(key, default)
            app.config.setdefault(key, settings[name])
        self._check_options(settings)
        state = AppState(engine if engine is not None else self._engine, settings)
        self._configure_offloader(settings)
        self._apps[app] = state
        app.extensions["llmbridge"] = self
        if settings["health"]:
            self._install_health(app, state)
        # Read through the framework's nested defaultdicts, never replace them: an app
        # that already handles LLMBridgeError keeps its own handler.
        if LLMBridgeError not in app.error_handler_spec[None][None]:
            app.register_error_handler(LLMBridgeError, self._handler())
        self._install(app, state)
        self._install_metrics(app, state)
        if settings["tracing"]:
            from .tracing import enable_tracing

            if reqlog.tracer is None:
                enable_tracing()

    def _install_metrics(self, app: Any, state: AppState) -> None:
        """Feed the app's engines into the ``llmbridge:`` metrics and serve them at the
        ``metrics_path`` option (``None``, the default: neither). Raises ImportError
        naming the extra without prometheus-client."""
        path = state.settings["metrics_path"]
        if path is None:
            return
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"metrics_path must be a path starting with / or None, got {path!r}")
        from . import metrics

        metrics.instrument(state.engine)
        if "llmbridge_metrics" in app.view_functions:
            return  # a second init_app on the same app
        app.add_url_rule(
            path, "llmbridge_metrics", self._metrics_view(metrics.render_metrics), methods=["GET"]
        )

    def _metrics_view(self, render: Callable[[], tuple[bytes, str]]) -> Callable[[], Any]:
        """The twin's ``/metrics`` view over ``render``."""
        raise NotImplementedError

    def _install_health(self, app: Any, state: AppState) -> None:
        """Add the liveness and readiness routes (see :mod:`llmbridge._web.health`)."""
        settings = state.settings
        health = Health(
            state.engine,
            stuck_after=settings["stuck_after"],
            warmup=settings["warmup"],
            draining=lambda: self._draining(state),
        )
        live, ready = health_paths(settings)
        web = self._web

        def answer(probe: Callable[[], tuple[int, dict[str, Any]]]) -> Any:
            return web.Response(*health_response(*probe()))

        app.add_url_rule(
            live, "llmbridge_livez", self._health_view(answer, health.live), methods=["GET"]
        )
        app.add_url_rule(
            ready, "llmbridge_readyz", self._health_view(answer, health.ready), methods=["GET"]
        )

    def _health_view(
        self,
        answer: Callable[[Callable[[], tuple[int, dict[str, Any]]]], Any],
        probe: Callable[[], tuple[int, dict[str, Any]]],
    ) -> Callable[[], Any]:
        """A view answering ``probe`` (the twin makes it a coroutine for Quart)."""
        return lambda: answer(probe)

    def _draining(self, state: AppState) -> bool:
        """Whether the app stopped admitting (the Quart bridge's drain)."""
        return False

    def _handler(self) -> Callable[[LLMBridgeError], Any]:
        """The error handler the twin registers (sync for Flask, async for Quart)."""
        raise NotImplementedError

    def _install(self, app: Any, state: AppState) -> None:
        """The twin's framework hooks."""

    def _configure_offloader(self, settings: Mapping[str, Any]) -> None:
        sizes = {
            "max_threads": settings["max_threads"],
            "max_processes": settings["max_processes"],
            "timeout": settings["offload_timeout"],
        }
        if self._offloader is None:
            self._offloader = Offloader(**sizes)
        elif not self._apps:
            # Decorators made at import time hold the offloader already; its pools are
            # sized when first used, so the first app's settings still apply.
            self._offloader.configure(**sizes)

    # -- state ------------------------------------------------------------------------

    def _state(self) -> AppState:
        web = self._web
        if web.has_app_context():
            state = self._apps.get(web.current_app._get_current_object())
            if state is None:
                raise RuntimeError(f"this {self._owner} is not installed on the current app")
            return state
        states = list(self._apps.values())
        if len(states) == 1:
            return states[0]
        if not states:
            raise RuntimeError(
                f"this {self._owner} is not installed on any app: "
                f"{self._owner}(app) or bridge.init_app(app)"
            )
        raise RuntimeError(
            f"working outside of an application context with a {self._owner} installed on "
            f"{len(states)} apps: use `with app.app_context():`"
        )

    @property
    def engines(self) -> list[Submitter]:
        """The engine of every app this bridge is installed on (for servers' lifespans)."""
        return [s.engine for s in list(self._apps.values()) if s.engine is not None]

    @property
    def engine(self) -> Submitter:
        """The engine of the current app (or of the only app).

        Raises :class:`~llmbridge.LLMBridgeError` when the app was given none.
        """
        engine = self._state().engine
        if engine is None:
            raise LLMBridgeError(
                f"this {self._owner} has no engine: pass one as "
                f"{self._owner}(app, engine=...) or init_app(app, engine=...)"
            )
        return engine

    @property
    def offloader(self) -> Offloader:
        """The bridge's thread and process pools (shared by all its apps)."""
        if self._offloader is None:
            self._offloader = Offloader(
                max_threads=self._options.get("max_threads", 40),
                max_processes=self._options.get("max_processes"),
                timeout=self._options.get("offload_timeout"),
            )
        return self._offloader

    def start(self) -> None:
        """Start every app's engine now (if it has ``start()``), not on first request."""
        for engine in self.engines:
            start = getattr(engine, "start", None)
            if callable(start):
                start()

    def close(self) -> None:
        """Close every app's engine (if it has ``close()``). Blocks until they stop."""
        for engine in self.engines:
            close = getattr(engine, "close", None)
            if callable(close):
                close()

    # -- requests ---------------------------------------------------------------------

    def submit(self, prompt: str, /, *, request_id: str | None = None, **params: Any) -> Stream:
        """Submit to the current app's engine; the raw :class:`~llmbridge.Stream`.

        ``request_id`` defaults to the client's valid ``X-Request-Id``; the response gets
        the engine's id in ``X-Request-Id``. Never blocks; raises the engine's admission
        errors (``Overloaded``, ...).
        """
        engine = self.engine
        request_id = request_id or _client_request_id(self._web)
        if "priority" not in params:
            priority = _client_priority(self._web, self._state().settings["priority_levels"])
            if priority is not None:
                params["priority"] = priority
        if request_id is None:
            stream = engine.submit(prompt, **params)
        else:
            stream = engine.submit(prompt, request_id=request_id, **params)
        _remember(self._web, stream.id)
        record = current_record(self._web)
        if record is not None and record.stream is None:
            record.stream = stream
        return stream

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        /,
        *,
        request_id: str | None = None,
        **params: Any,
    ) -> Stream:
        """Submit a chat to the current app's engine (see :meth:`llmbridge.Engine.chat`):
        ``messages`` go to the backend, rendered by the default chat template as the
        prompt. Hand the stream to :meth:`sse` / :meth:`stream` like any other
        (``bridge.sse(bridge.chat(messages))``). Never blocks; raises as :meth:`submit`."""
        clean = chat_messages(messages)
        return self.submit(render_messages(clean), request_id=request_id, messages=clean, **params)

    def _submit(self, prompt: str | Stream, params: dict[str, Any]) -> Stream:
        if isinstance(prompt, Stream):
            if params:
                raise TypeError("parameters go to submit(), not with an already submitted stream")
            _remember(self._web, prompt.id)
            record = current_record(self._web)
            if record is not None and record.stream is None:
                record.stream = prompt
            return prompt
        return self.submit(prompt, **params)

    def _started(self, stream: Stream) -> Stream:
        """``stream`` once it has output; blocks the calling thread."""
        try:
            stream.wait_started(self._state().settings["start_timeout"])
        except BaseException:
            stream.cancel()
            raise
        return stream

    async def _astarted(self, prompt: str | Stream, params: dict[str, Any]) -> Stream:
        stream = self._submit(prompt, params)
        try:
            await stream.await_started(self._state().settings["start_timeout"])
        except BaseException:
            stream.cancel()
            raise
        return stream

    async def _agenerate(self, prompt: str, params: dict[str, Any]) -> str:
        stream = self.submit(prompt, **params)
        return (await stream.aresult(self._state().settings["timeout"])).text

    def _body(self, stream: Stream, format: BodyFormat) -> StreamBody:
        settings = self._state().settings
        record = current_record(self._web)
        if record is not None:
            record.deferred = True  # the line is written when the body closes

        def closed() -> None:
            # A failure after the 200 was sent: the client got a generic error event.
            try:
                stream.channel.completion()
            except Cancelled:
                pass
            except LLMBridgeError as error:
                log_answer(error, stream.id)
            except RuntimeError:
                pass  # not ended: the body was closed early, which cancelled it
            if record is not None:
                record.finish(request_id=stream.id)

        return StreamBody(
            stream,
            format=format,
            heartbeat=settings["heartbeat"],
            start_timeout=settings["start_timeout"],
            on_close=closed,
        )

    @staticmethod
    def _stream_headers(stream: Stream) -> dict[str, str]:
        return {
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: don't buffer the stream
            REQUEST_ID_HEADER: stream.id,
        }

    def _problem_response(self, error: LLMBridgeError) -> Any:
        body, status, headers = problem_parts(self._web, error)
        return self._web.Response(body, status, headers)

    def _tag(self, response: Any) -> Any:
        """``after_request``: the request's id on responses of views that used the bridge."""
        g = self._web.g
        request_id = getattr(g, _G_KEY, None)
        if request_id is not None and REQUEST_ID_HEADER not in response.headers:
            response.headers[REQUEST_ID_HEADER] = request_id
        record: RequestRecord | None = getattr(g, RECORD_KEY, None)
        if record is not None:
            record.status = response.status_code
            if not record.deferred:
                record.finish(request_id=request_id)
        return response

    # -- offload, awaited -------------------------------------------------------------

    async def _ato_thread(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        return await self.offloader.arun_in_thread(fn, *args, timeout=timeout, **kwargs)

    async def _ato_process(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> T:
        return await self.offloader.arun_in_process(fn, *args, timeout=timeout, **kwargs)
