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

The engine starts with the app's ``before_serving`` and closes with ``after_serving``. On
SIGTERM the bridge stops admitting (503 problem+json with ``Retry-After``), lets open
streams run up to ``drain_timeout`` and then ends them with a final ``event: error``,
before the server's own graceful timeout. Streams are exempt from ``RESPONSE_TIMEOUT``;
a client disconnect cancels the job.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, ParamSpec, TypeVar, overload

try:
    from quart import Quart, Response
except ImportError:  # pragma: no cover - exercised without quart installed
    raise ImportError('llmbridge.quart needs Quart: pip install "llmbridge[quart]"') from None


from ._core.engine import Submitter
from ._core.stream import Stream
from ._exceptions import LLMBridgeError
from ._runtime.offload import DEFAULT, Offloaded, Offloader, ProcessOffloaded, TimeoutArg
from ._sansio.options import check_bridge_options
from ._sansio.problem import problem, problem_headers
from ._web.body import BodyFormat, StreamBody
from ._web.drain import Drain, find_engines

__all__ = ["QuartBridge", "StartingStream", "problem_response"]

P = ParamSpec("P")
T = TypeVar("T")

#: Option name -> (config key, default). Keyword options win over app.config.
_SETTINGS: dict[str, tuple[str, Any]] = {
    "heartbeat": ("LLMBRIDGE_HEARTBEAT", 15.0),
    "start_timeout": ("LLMBRIDGE_START_TIMEOUT", 60.0),
    "timeout": ("LLMBRIDGE_TIMEOUT", None),
    "max_threads": ("LLMBRIDGE_MAX_THREADS", 40),
    "max_processes": ("LLMBRIDGE_MAX_PROCESSES", None),
    "offload_timeout": ("LLMBRIDGE_OFFLOAD_TIMEOUT", None),
    "drain_timeout": ("LLMBRIDGE_DRAIN_TIMEOUT", 10.0),
    "retry_after": ("LLMBRIDGE_RETRY_AFTER", 5.0),
    "handle_signals": ("LLMBRIDGE_HANDLE_SIGNALS", True),
}


def _check_options(options: dict[str, Any]) -> None:
    check_bridge_options("QuartBridge", options, _SETTINGS)


def problem_response(error: LLMBridgeError) -> Response:
    """The ``application/problem+json`` response for ``error``, with ``Retry-After`` when
    it has ``retry_after``. The bridge registers it for :class:`~llmbridge.LLMBridgeError`."""
    headers = problem_headers(error)
    return Response(
        json.dumps(problem(error)),
        status=error.status,
        content_type=headers.pop("Content-Type"),
        headers=headers,
    )


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


class QuartBridge:
    """The Quart extension: submit to an engine from async views, answer with text or SSE.

    ``engine`` is any :class:`~llmbridge.Submitter`. Options (keyword or ``LLMBRIDGE_*``
    config, keywords win): ``heartbeat`` (15 s), ``start_timeout`` (60 s), ``timeout``
    (for :meth:`generate`), ``max_threads`` / ``max_processes`` / ``offload_timeout``
    (the offload pools), ``drain_timeout`` (10 s; keep it under the server's graceful
    timeout), ``retry_after`` (5 s, sent with 503 while draining), ``handle_signals``
    (True: start draining on SIGTERM/SIGINT, before the server waits for connections).

    ``app.extensions["llmbridge"]`` is the bridge. Every coroutine runs on the app's loop
    and never blocks it; cancelling one (a client disconnect) cancels its job.
    """

    def __init__(
        self, app: Quart | None = None, *, engine: Submitter | None = None, **options: Any
    ) -> None:
        _check_options(options)
        self._engine = engine
        self._options = options
        self._settings: dict[str, Any] = {name: default for name, (_, default) in _SETTINGS.items()}
        self._settings.update(options)
        self._offloader: Offloader | None = None
        self._drain: Drain | None = None
        self.app: Quart | None = None
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<QuartBridge engine={self._engine!r}>"

    def init_app(self, app: Quart, *, engine: Submitter | None = None, **options: Any) -> None:
        """Install the bridge on ``app`` (error handler, serving hooks, drain check).

        Raises ``TypeError`` without an engine or for an unknown option.
        """
        _check_options(options)
        engine = engine if engine is not None else self._engine
        if engine is None:
            raise TypeError("QuartBridge needs an engine: QuartBridge(app, engine=...)")
        if not callable(getattr(engine, "submit", None)):
            raise TypeError(f"engine must have a submit() method, got {type(engine).__name__}")
        self._engine = engine
        given = {**self._options, **options}
        for name, (key, default) in _SETTINGS.items():
            self._settings[name] = given[name] if name in given else app.config.get(key, default)
            app.config.setdefault(key, self._settings[name])
        _check_options(self._settings)
        if self._offloader is None:
            self._offloader = Offloader(
                max_threads=self._settings["max_threads"],
                max_processes=self._settings["max_processes"],
                timeout=self._settings["offload_timeout"],
            )
        else:  # decorators made before init_app hold this offloader already
            self._offloader.configure(
                max_threads=self._settings["max_threads"],
                max_processes=self._settings["max_processes"],
                timeout=self._settings["offload_timeout"],
            )
        self._drain = Drain(
            timeout=self._settings["drain_timeout"], retry_after=self._settings["retry_after"]
        )
        self.app = app
        app.extensions["llmbridge"] = self
        handlers = app.error_handler_spec.setdefault(None, {}).setdefault(None, {})
        if LLMBridgeError not in handlers:
            app.register_error_handler(LLMBridgeError, problem_response)
        app.before_serving(self._before_serving)
        app.after_serving(self._after_serving)
        app.before_request(self._admit)

    # -- state and serving hooks --------------------------------------------------------

    @property
    def engine(self) -> Submitter:
        """The engine requests go to."""
        if self._engine is None:
            raise RuntimeError("QuartBridge has no engine: call init_app(app, engine=...)")
        return self._engine

    @property
    def offloader(self) -> Offloader:
        """The bridge's thread and process pools."""
        if self._offloader is None:
            self._offloader = Offloader(
                max_threads=self._settings["max_threads"],
                max_processes=self._settings["max_processes"],
                timeout=self._settings["offload_timeout"],
            )
        return self._offloader

    @property
    def drain(self) -> Drain:
        """The bridge's shutdown state."""
        if self._drain is None:
            self._drain = Drain(
                timeout=self._settings["drain_timeout"], retry_after=self._settings["retry_after"]
            )
        return self._drain

    async def _before_serving(self) -> None:
        self.drain.bind(asyncio.get_running_loop(), lambda: find_engines(self._engine))
        for engine in find_engines(self._engine):
            engine.start()
        if self._settings["handle_signals"]:
            self.drain.install_signal_handlers()

    async def _after_serving(self) -> None:
        try:
            await self.drain.run()
        finally:
            self.drain.restore_signal_handlers()

    async def _admit(self) -> Response | None:
        if not self.drain.admitting:
            return problem_response(self.drain.refusal())
        return None

    # -- generation -------------------------------------------------------------------

    def submit(self, prompt: str, /, **params: Any) -> Stream:
        """Submit to the engine; the raw :class:`~llmbridge.Stream`. Never blocks."""
        return self.engine.submit(prompt, **params)

    async def generate(self, prompt: str, /, **params: Any) -> str:
        """The whole completion text, awaited without blocking the loop.

        Raises the request's :class:`~llmbridge.LLMBridgeError`, or
        :class:`~llmbridge.Timeout` after the ``timeout`` option (the job is cancelled).
        Cancelling the awaiting task (a client disconnect) cancels the job.
        """
        stream = self.engine.submit(prompt, **params)
        return (await stream.aresult(self._settings["timeout"])).text

    def stream(self, prompt: str | Stream, /, **params: Any) -> StartingStream:
        """The completion as it is produced: ``async for chunk in bridge.stream(...)``,
        or ``stream = await bridge.stream(...)`` for the started
        :class:`~llmbridge.Stream`.

        The first output is awaited before anything is yielded, so errors before any text
        raise here; :class:`~llmbridge.Timeout` after ``start_timeout``. Leaving the loop
        early or a disconnect cancels the job.
        """
        return StartingStream(lambda: self._started(prompt, params))

    async def _started(self, prompt: str | Stream, params: dict[str, Any]) -> Stream:
        if isinstance(prompt, Stream):
            if params:
                raise TypeError("parameters go to submit(), not with an already submitted stream")
            stream = prompt
        else:
            stream = self.engine.submit(prompt, **params)
        try:
            await stream.await_started(self._settings["start_timeout"])
        except BaseException:
            stream.cancel()
            raise
        return stream

    async def sse(self, prompt: str | Stream, /, **params: Any) -> Response:
        """A ``text/event-stream`` response streaming the completion.

        The same events as the Flask bridge (``data: {"text": ...}``, heartbeats, a final
        ``event: done`` or ``event: error``). Awaits the first output first, so early
        failures are problem responses. Exempt from ``RESPONSE_TIMEOUT``; a disconnect
        cancels the job.
        """
        return self._response(await self._started(prompt, params), "sse")

    async def stream_response(self, prompt: str | Stream, /, **params: Any) -> Response:
        """A ``text/plain`` response streaming the raw completion (see :meth:`sse`; an
        error mid-stream drops the connection)."""
        return self._response(await self._started(prompt, params), "text")

    def _response(self, stream: Stream, format: BodyFormat) -> Response:
        body = StreamBody(stream, format=format, heartbeat=self._settings["heartbeat"])
        response = Response(
            self._pump(body),
            content_type=body.media_type,
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-LLMBridge-Request-Id": stream.id,
            },
        )
        response.timeout = None  # a stream lasts as long as it lasts: no RESPONSE_TIMEOUT
        return response

    async def _pump(self, body: StreamBody) -> AsyncIterator[bytes]:
        drain = self.drain
        drain.enter()
        drain.track(body)
        try:
            async for chunk in body:
                yield chunk
        finally:
            drain.untrack(body)
            drain.leave()
            body.close()

    # -- offload ----------------------------------------------------------------------

    @overload
    def to_thread(
        self, fn: None = None, /, *, timeout: TimeoutArg = DEFAULT
    ) -> Callable[[Callable[P, T]], _AsyncOffloaded[P, T]]: ...

    @overload
    def to_thread(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> Awaitable[T]: ...

    def to_thread(
        self,
        fn: Callable[..., T] | None = None,
        /,
        *args: Any,
        timeout: TimeoutArg = DEFAULT,
        **kwargs: Any,
    ) -> Any:
        """``await bridge.to_thread(fn, *args)``: run a blocking call in the bounded thread
        pool without blocking the loop.

        ``timeout`` (default: ``offload_timeout``) raises :class:`~llmbridge.Timeout`
        (504); the timed-out thread keeps its pool slot until it returns. As a decorator,
        ``@bridge.to_thread(timeout=5)`` makes ``await fn(...)`` do the same.
        """
        if fn is None:

            def decorate(fn: Callable[P, T]) -> _AsyncOffloaded[P, T]:
                return _AsyncOffloaded(self.offloader, fn, timeout)

            return decorate
        return self.offloader.arun_in_thread(fn, *args, timeout=timeout, **kwargs)

    @overload
    def to_process(
        self, fn: None = None, /, *, timeout: TimeoutArg = DEFAULT
    ) -> Callable[[Callable[P, T]], _AsyncProcessOffloaded[P, T]]: ...

    @overload
    def to_process(
        self, fn: Callable[..., T], /, *args: Any, timeout: TimeoutArg = DEFAULT, **kwargs: Any
    ) -> Awaitable[T]: ...

    def to_process(
        self,
        fn: Callable[..., T] | None = None,
        /,
        *args: Any,
        timeout: TimeoutArg = DEFAULT,
        **kwargs: Any,
    ) -> Any:
        """``await bridge.to_process(fn, *args)``: run a call that holds the GIL in a
        worker process. ``fn``, arguments and result must pickle; ``timeout`` raises
        :class:`~llmbridge.Timeout` and kills the worker. As a decorator (module-level
        functions only): ``@bridge.to_process(timeout=5)``.
        """
        if fn is None:

            def decorate(fn: Callable[P, T]) -> _AsyncProcessOffloaded[P, T]:
                return _AsyncProcessOffloaded(self.offloader, fn, timeout)

            return decorate
        return self.offloader.arun_in_process(fn, *args, timeout=timeout, **kwargs)
