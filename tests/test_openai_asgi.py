"""The Flask ``/v1`` blueprint under llmbridge.asgi, in process: a whole (non-streamed)
answer holds no thread while it is produced, keeps the app's headers, gets its own error
status, is cancelled when the client leaves, and is drained on shutdown."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from asgi_driver import Client, request
from flask import Flask, Response

from llmbridge import Engine
from llmbridge.asgi import to_asgi
from llmbridge.backends import CallableBackend
from llmbridge.openai import Settings, flask_blueprint
from llmbridge.testing import simulated_engine

from support import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SETTINGS = Settings(models=("sim",), max_tokens_limit=100_000)


def _body(prompt: str, max_tokens: int = 8, **extra: Any) -> list[bytes]:
    data = {"model": "sim", "prompt": prompt, "max_tokens": max_tokens, **extra}
    return [json.dumps(data).encode()]


_JSON = [(b"content-type", b"application/json")]


class Gated:
    """A blocking backend whose calls all wait for :attr:`release`; counts who entered."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def __call__(self, prompt: str, **params: Any) -> Iterator[str]:
        with self._lock:
            self.entered += 1
        if not self.release.wait(30):
            raise AssertionError("never released")
        yield f"answer to {prompt}"


def _flask(engine: Any, **options: Any) -> Flask:
    app = Flask(__name__)
    app.register_blueprint(flask_blueprint(engine, auth=None, settings=SETTINGS, **options))

    @app.after_request
    def tag(response: Response) -> Response:
        response.headers["X-App"] = "tagged"
        return response

    return app


@pytest.fixture
def gated() -> Iterator[tuple[Gated, Engine]]:
    backend = Gated()
    engine = Engine(CallableBackend(backend, max_threads=64))
    try:
        yield backend, engine
    finally:
        backend.release.set()
        engine.close(5)


async def test_whole_answers_hold_no_thread_while_they_are_produced(
    gated: tuple[Gated, Engine],
) -> None:
    """With one adapter thread, 30 non-streamed requests are all submitted and waiting
    at once (a thread per answer would submit them one by one), then each gets its own
    answer."""
    backend, engine = gated
    adapter = to_asgi(_flask(engine), workers=1)
    answers: dict[int, Any] = {}

    async def one(i: int) -> None:
        answers[i] = await request(
            adapter, "POST", "/v1/completions", headers=_JSON, body=_body(f"p{i}")
        )

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(one, i)
        entered = await anyio.to_thread.run_sync(lambda: wait_until(lambda: backend.entered == 30))
        assert entered, f"only {backend.entered} of 30 requests reached the backend"
        # The one thread is free, too: another route answers meanwhile.
        with anyio.fail_after(5):
            models = await request(adapter, "GET", "/v1/models")
        assert models.status == 200
        backend.release.set()
    for i, response in answers.items():
        assert response.status == 200, response.body
        assert response.json()["choices"][0]["text"] == f"answer to p{i}"
        assert response.header("content-length") == str(len(response.body))


async def test_a_whole_answer_keeps_the_apps_headers_and_its_own_error_status(
    gated: tuple[Gated, Engine],
) -> None:
    """The answer the adapter sends keeps what the app's after_request added, and an
    answer that fails (no output within start_timeout), whole or streamed, is OpenAI's
    504, tagged too."""
    backend, engine = gated
    adapter = to_asgi(_flask(engine, start_timeout=0.3), workers=1)
    with anyio.fail_after(10):
        late = await request(adapter, "POST", "/v1/completions", headers=_JSON, body=_body("x"))
    assert late.status == 504, late.body
    assert late.json()["error"]["code"] == "timeout"
    assert late.header("content-type") == "application/json"
    assert late.header("x-app") == "tagged"
    assert late.header("x-request-id")
    # A stream that fails before its first text is answered the same way (the reply
    # the adapter sends instead of the app's body keeps the app's headers too).
    streamed = _body("z", stream=True)
    with anyio.fail_after(10):
        late_stream = await request(
            adapter, "POST", "/v1/completions", headers=_JSON, body=streamed
        )
    assert late_stream.status == 504, late_stream.body
    assert late_stream.json()["error"]["code"] == "timeout"
    assert late_stream.header("x-app") == "tagged"
    backend.release.set()
    headers = [*_JSON, (b"x-request-id", b"mine-1")]
    ok = await request(adapter, "POST", "/v1/completions", headers=headers, body=_body("y"))
    assert ok.status == 200
    assert ok.header("x-app") == "tagged"
    assert ok.header("x-request-id") == "mine-1"
    assert ok.header("content-type") == "application/json"
    assert ok.json()["choices"][0]["text"] == "answer to y"


async def test_a_client_that_leaves_cancels_its_whole_answer() -> None:
    """A disconnect while a whole answer is produced cancels its engine job."""
    engine = simulated_engine(step_time=0.01, max_new_tokens=100_000)
    generator = engine.backend.generator
    adapter = to_asgi(_flask(engine), workers=1)
    client = Client(adapter)
    headers = [*_JSON, (b"x-request-id", b"leaving-1")]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: client.request(
                    "POST", "/v1/completions", headers=headers, body=_body("long", 90_000)
                )
            )
            running = await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: generator.jobs_in_flight == 1)
            )
            assert running
            client.disconnect()
        assert await anyio.to_thread.run_sync(
            lambda: wait_until(lambda: "leaving-1" in generator.cancelled)
        )
        assert client.response.status is None  # nobody was left to answer
    finally:
        engine.close(5)


async def test_shutdown_ends_a_long_whole_answer_with_a_503() -> None:
    """Past the drain deadline a whole answer still waiting is OpenAI's 503
    (engine_closed): not a hang, not a broken body."""
    engine = simulated_engine(step_time=0.01, max_new_tokens=100_000)
    adapter = to_asgi(_flask(engine), drain_timeout=0.3, handle_signals=False, engines=[engine])
    client = Client(adapter)
    generator = engine.backend.generator
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: client.request(
                    "POST", "/v1/completions", headers=_JSON, body=_body("long", 90_000)
                )
            )
            assert await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: generator.jobs_in_flight == 1)
            )
            with anyio.fail_after(10):
                await adapter.shutdown()
        response = client.response
        assert response.status == 503, response.body
        assert response.json()["error"]["code"] == "engine_closed"
        assert response.complete
    finally:
        engine.close(5)


async def test_a_wrapping_middleware_still_gets_the_whole_answer() -> None:
    """A WSGI middleware that iterates the response gets the answer's bytes on its thread."""
    engine = simulated_engine(step_time=0.001, max_new_tokens=8)
    app = _flask(engine)
    inner = app.wsgi_app
    seen: list[bytes] = []

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        iterable = inner(environ, start_response)
        try:
            for chunk in iterable:
                seen.append(chunk)
                yield chunk
        finally:
            iterable.close()  # type: ignore[attr-defined]

    app.wsgi_app = middleware  # type: ignore[method-assign]
    try:
        response = await request(
            to_asgi(app), "POST", "/v1/completions", headers=_JSON, body=_body("wrapped")
        )
        assert response.status == 200
        expected = engine.backend.generator.expected_text("wrapped", 8)
        assert response.json()["choices"][0]["text"] == expected
        assert b"".join(seen) == response.body
    finally:
        engine.close(5)
