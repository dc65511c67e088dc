"""llmbridge.asgi with bridge streams, in process: streams pumped on the loop, thread
released, disconnect cancels, close() once, lifespan and draining."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from asgi_driver import Client, request
from flask import Flask, Response

from llmbridge._sansio.sse import ServerSentEvent, SSEDecoder
from llmbridge._web.body import ASYNC_BODY_KEY, StreamBody
from llmbridge.asgi import WSGIMiddleware, to_asgi
from llmbridge.flask import FlaskBridge
from llmbridge.testing import simulated_engine

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def events(body: bytes) -> list[ServerSentEvent]:
    return SSEDecoder().feed(body)


def text_of(body: bytes) -> str:
    return "".join(e.json()["text"] for e in events(body) if e.event == "message")


class App:
    """A Flask app with a bridge, plus a view that counts its body's close()."""

    def __init__(self, **engine_options: Any) -> None:
        self.engine = simulated_engine(**engine_options)
        self.generator = self.engine.backend.generator
        self.flask = Flask(__name__)
        self.bridge = FlaskBridge(self.flask, engine=self.engine, heartbeat=None)
        self.closes: dict[str, int] = {}
        self.stream_ids: dict[str, str] = {}
        flask_app = self.flask
        bridge = self.bridge

        @flask_app.get("/sse/<prompt>")
        def sse(prompt: str) -> Response:
            return bridge.sse(prompt)

        @flask_app.get("/counted/<prompt>")
        def counted(prompt: str) -> Response:
            from flask import request as flask_request

            stream = bridge.stream(prompt)
            self.stream_ids[prompt] = stream.id
            self.closes[prompt] = 0

            def on_close() -> None:
                self.closes[prompt] += 1

            body = StreamBody(stream, heartbeat=None, on_close=on_close)
            return Response(
                flask_request.environ[ASYNC_BODY_KEY](body),
                content_type=body.media_type,
                direct_passthrough=True,
            )

        @flask_app.get("/text/<prompt>")
        def text(prompt: str) -> Response:
            return bridge.stream_response(prompt, error_after=3)

        @flask_app.get("/ping")
        def ping() -> str:
            return "pong"


@pytest.fixture
def app() -> Iterator[App]:
    made = App(step_time=0.002, max_new_tokens=16)
    yield made
    made.engine.close(5)


async def test_streams_are_correct_and_isolated(app: App) -> None:
    """40 concurrent SSE streams each get exactly their own prompt's text."""
    adapter = to_asgi(app.flask, workers=2)
    results: dict[str, bytes] = {}

    async def one(i: int) -> None:
        results[f"p{i}"] = (await request(adapter, "GET", f"/sse/p{i}")).body

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(one, i)
    for prompt, body in results.items():
        assert text_of(body) == app.generator.expected_text(prompt)
        assert events(body)[-1].event == "done"
    assert app.generator.concurrent_entries == 0


async def test_a_stream_gives_its_thread_back(app: App) -> None:
    """With one worker thread, a plain request is served while a stream is open."""
    long = App(step_time=0.01, max_new_tokens=100_000)
    adapter = to_asgi(long.flask, workers=1)
    streaming = Client(adapter)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(streaming.request, "GET", "/counted/long")
            await streaming.first_body.wait()
            with anyio.fail_after(10):
                pong = await request(adapter, "GET", "/ping")
            assert pong.body == b"pong"
            assert not streaming.response.complete
            streaming.disconnect()
        job_id = long.stream_ids["long"]
        assert await anyio.to_thread.run_sync(
            lambda: _wait(lambda: job_id in long.generator.cancelled)
        )
        assert long.closes["long"] == 1
    finally:
        long.engine.close(5)


async def test_counted_close_once_on_normal_end(app: App) -> None:
    """A stream that runs to its end is closed exactly once."""
    response = await request(to_asgi(app.flask), "GET", "/counted/done")
    assert text_of(response.body) == app.generator.expected_text("done")
    assert response.complete
    assert app.closes["done"] == 1


async def test_a_wrapping_middleware_gets_a_plain_iterable(app: App) -> None:
    """A WSGI middleware that iterates the response still works (thread-held fallback)."""
    inner = app.flask.wsgi_app
    closed: list[int] = []

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        iterable = inner(environ, start_response)
        try:
            yield from iterable
        finally:
            iterable.close()  # type: ignore[attr-defined]
            closed.append(1)

    app.flask.wsgi_app = middleware  # type: ignore[method-assign]
    response = await request(to_asgi(app.flask), "GET", "/counted/wrapped")
    assert text_of(response.body) == app.generator.expected_text("wrapped")
    assert app.closes["wrapped"] == 1
    assert closed == [1]


async def test_text_stream_error_mid_body_aborts_the_response(app: App) -> None:
    """A failing text stream can't be told apart from a complete one: the adapter aborts."""
    response = await request(to_asgi(app.flask), "GET", "/text/broken")
    assert response.status == 200
    assert not response.complete
    assert response.error is not None


async def test_non_streambody_is_refused_by_the_extension() -> None:
    """environ[ASYNC_BODY_KEY] takes only a StreamBody or a WholeBody: anything else is a
    500 problem."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return environ[ASYNC_BODY_KEY]([b"not a body"])

    response = await request(to_asgi(wsgi))
    assert response.status == 500
    assert response.json()["status"] == 500


# -- lifespan and draining ----------------------------------------------------------------


class Lifespan:
    """Drives an app's lifespan scope from a test."""

    def __init__(self, app: WSGIMiddleware) -> None:
        self.app = app
        self.inbox: list[str] = []
        self.outbox: list[dict[str, Any]] = []
        self.wake = anyio.Event()
        self.replied = anyio.Event()

    async def run(self) -> None:
        async def receive() -> dict[str, Any]:
            while not self.inbox:
                await self.wake.wait()
                self.wake = anyio.Event()
            return {"type": self.inbox.pop(0)}

        async def send(message: dict[str, Any]) -> None:
            self.outbox.append(message)
            self.replied.set()

        await self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    async def send(self, kind: str) -> dict[str, Any]:
        self.replied = anyio.Event()
        self.inbox.append(kind)
        self.wake.set()
        await self.replied.wait()
        return self.outbox[-1]


async def test_lifespan_starts_engines_runs_hooks_and_closes() -> None:
    """Startup starts the app's engine; shutdown closes it, then runs on_shutdown."""
    made = App()
    log: list[str] = []

    async def on_shutdown() -> None:
        log.append(f"shutdown running={made.engine.running}")

    adapter = to_asgi(
        made.flask,
        on_startup=lambda: log.append("startup"),
        on_shutdown=on_shutdown,
        handle_signals=False,
    )
    lifespan = Lifespan(adapter)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lifespan.run)
        assert (await lifespan.send("lifespan.startup"))["type"] == "lifespan.startup.complete"
        assert made.engine.running
        response = await request(adapter, "GET", "/sse/x")
        assert events(response.body)[-1].event == "done"
        assert (await lifespan.send("lifespan.shutdown"))["type"] == "lifespan.shutdown.complete"
    assert log == ["startup", "shutdown running=False"]
    refused = await request(adapter, "GET", "/ping")
    assert refused.status == 503
    assert refused.header("content-type") == "application/problem+json"
    assert refused.header("retry-after") == "5"
    assert refused.json()["error"] == "EngineClosed"


async def test_failing_startup_hook_reports_startup_failed() -> None:
    """An exception in on_startup becomes lifespan.startup.failed, not a hang."""

    def broken() -> None:
        raise RuntimeError("no model")

    adapter = to_asgi(App().flask, on_startup=broken, handle_signals=False)
    lifespan = Lifespan(adapter)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lifespan.run)
        reply = await lifespan.send("lifespan.startup")
    assert reply["type"] == "lifespan.startup.failed"
    assert "no model" in reply["message"]


async def test_drain_ends_a_long_stream_with_a_final_error_event() -> None:
    """Past the drain deadline an open stream ends with event: error (EngineClosed)."""
    made = App(step_time=0.01, max_new_tokens=100_000)
    adapter = to_asgi(made.flask, drain_timeout=0.3, handle_signals=False)
    streaming = Client(adapter)
    async with anyio.create_task_group() as tg:
        tg.start_soon(streaming.request, "GET", "/counted/long")
        await streaming.first_body.wait()
        with anyio.fail_after(10):
            await adapter.shutdown()
    final = events(streaming.response.body)[-1]
    assert final.event == "error"
    assert final.json()["status"] == 503
    assert final.json()["error"] == "EngineClosed"
    assert streaming.response.complete
    assert made.closes["long"] == 1
    assert not made.engine.running


async def test_drain_lets_short_streams_finish() -> None:
    """A stream that ends before the deadline ends normally (event: done)."""
    made = App(step_time=0.02, max_new_tokens=10)
    adapter = to_asgi(made.flask, drain_timeout=20, handle_signals=False)
    streaming = Client(adapter)
    async with anyio.create_task_group() as tg:
        tg.start_soon(streaming.request, "GET", "/counted/short")
        await streaming.first_body.wait()
        await adapter.shutdown()
    assert events(streaming.response.body)[-1].event == "done"
    assert text_of(streaming.response.body) == made.generator.expected_text("short", 10)


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    from support import wait_until

    return wait_until(predicate, timeout)


async def test_sse_under_the_adapter_holds_no_thread_before_its_first_token() -> None:
    """bridge.sse() returns at once under the adapter; a slow start still gets its 504."""
    import threading

    release = threading.Event()

    def slow_start(prompt: str) -> Iterator[str]:
        release.wait(10)
        yield prompt

    from llmbridge import Engine
    from llmbridge.backends import CallableBackend

    engine = Engine(CallableBackend(slow_start, max_threads=4))
    flask_app = Flask(__name__)
    bridge = FlaskBridge(flask_app, engine=engine, heartbeat=None, start_timeout=0.3)

    @flask_app.get("/sse/<prompt>")
    def sse(prompt: str) -> Response:
        return bridge.sse(prompt)

    @flask_app.get("/ping")
    def ping() -> str:
        return "pong"

    adapter = to_asgi(flask_app, workers=1)
    try:
        with anyio.fail_after(10):
            timed_out = await request(adapter, "GET", "/sse/late")
        assert timed_out.status == 504
        assert dict(timed_out.headers)[b"content-type"] == b"application/problem+json"
        # With one worker thread, a waiting stream must not block other requests.
        waiting = Client(adapter)
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting.request, "GET", "/sse/second")
            with anyio.fail_after(5):
                pong = await request(adapter, "GET", "/ping")
            assert pong.body == b"pong"
            release.set()
            await waiting.first_body.wait()
        assert text_of(waiting.response.body) == "second"
    finally:
        release.set()
        engine.close(5)
