"""FlaskBridge (llmbridge/flask.py) through Flask's test client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Blueprint, Flask, current_app, request

from llmbridge import (
    BadRequest,
    Engine,
    LLMBridgeError,
    Overloaded,
    RateLimited,
    Stream,
    Timeout,
)
from llmbridge._sansio.sse import ServerSentEvent, SSEDecoder
from llmbridge._web.body import ASYNC_BODY_KEY, StreamBody
from llmbridge.flask import FlaskBridge
from llmbridge.testing import simulated_engine

from support import wait_until


def events(data: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return decoder.feed(data)


def texts(evs: list[ServerSentEvent]) -> str:
    return "".join(json.loads(e.data)["text"] for e in evs if e.event == "message")


@pytest.fixture
def engine() -> Iterator[Any]:
    engine = simulated_engine(step_time=0.001)
    yield engine
    engine.close()


@pytest.fixture
def app(engine: Any) -> Flask:
    app = Flask(__name__)
    app.config["TESTING"] = True
    bridge = FlaskBridge(app, engine=engine, heartbeat=0.05)

    @app.get("/generate")
    def generate() -> dict[str, str]:
        return {"text": bridge.generate(request.args["p"], max_new_tokens=5)}

    @app.get("/sse")
    def sse() -> Any:
        return bridge.sse(request.args["p"], max_new_tokens=int(request.args.get("n", 6)))

    @app.get("/text")
    def text() -> Any:
        return bridge.stream_response(request.args["p"], max_new_tokens=6)

    @app.get("/chunks")
    def chunks() -> dict[str, list[str]]:
        return {"chunks": list(bridge.stream(request.args["p"], max_new_tokens=6))}

    return app


class RefusingSubmitter:
    """A policy wrapper that refuses admission (any Submitter is accepted)."""

    def __init__(self, error: LLMBridgeError) -> None:
        self.error = error

    def submit(self, prompt: str, /, **params: Any) -> Stream:
        raise self.error


def test_generate_and_stream_return_exactly_the_engines_text(app: Flask, engine: Any) -> None:
    """generate(), stream() and both streaming responses carry the request's own text."""
    expected = engine.backend.generator.expected_text
    client = app.test_client()
    assert client.get("/generate?p=alpha").json == {"text": expected("alpha", 5)}
    assert "".join(client.get("/chunks?p=beta").json["chunks"]) == expected("beta", 6)
    reply = client.get("/text?p=gamma")
    assert reply.content_type == "text/plain; charset=utf-8"
    assert reply.get_data(as_text=True) == expected("gamma", 6)


def test_sse_events_headers_and_final_event(app: Flask, engine: Any) -> None:
    """sse(): text/event-stream, no caching, one JSON data event per chunk, then a done
    event with finish reason and usage."""
    reply = app.test_client().get("/sse?p=delta")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert reply.headers["Cache-Control"] == "no-cache"
    request_id = reply.headers["X-Request-Id"]
    evs = events(reply.data)
    assert texts(evs) == engine.backend.generator.expected_text("delta", 6)
    done = json.loads(evs[-1].data)
    assert evs[-1].event == "done"
    assert done["id"] == request_id
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 6


def test_sse_framing_cannot_be_forged_by_the_text() -> None:
    """Chunks holding newlines, 'data:' and 'event:' arrive intact inside data events."""
    hostile = [
        "line one\nline two",
        "\n\ndata: forged\n\n",
        "event: done\ndata: {}\n\n",
        "\r\n\r",
        "ünïcode ✓",
    ]

    def backend(prompt: str) -> Iterator[str]:
        yield from hostile

    app = Flask(__name__)
    with Engine(backend) as engine:
        bridge = FlaskBridge(app, engine=engine)
        app.add_url_rule("/", "/", lambda: bridge.sse("x"))
        evs = events(app.test_client().get("/").data)
    # Chunks may coalesce; what matters is that no text became an event of its own.
    assert {e.event for e in evs[:-1]} == {"message"}
    assert evs[-1].event == "done"
    assert json.loads(evs[-1].data)["finish_reason"] == "stop"
    assert texts(evs) == "".join(hostile)


def test_heartbeats_while_the_engine_is_silent() -> None:
    """With nothing to send for longer than the heartbeat, the body sends SSE comments."""
    release = threading.Event()

    def backend(prompt: str) -> Iterator[str]:
        yield "first"
        release.wait(10)
        yield "last"

    app = Flask(__name__)
    with Engine(backend) as engine:
        bridge = FlaskBridge(app, engine=engine, heartbeat=0.02)
        app.add_url_rule("/", "/", lambda: bridge.sse("x"))
        reply = app.test_client().get("/", buffered=False)
        body = iter(reply.response)
        seen = [next(body), next(body), next(body)]
        release.set()
        seen.extend(body)
        reply.close()
    assert seen[0].startswith(b"data: ")
    assert seen[1] == seen[2] == b":\n\n"
    assert texts(events(b"".join(seen))) == "firstlast"


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (Overloaded("queue full", retry_after=2.5), 503, "3"),
        (RateLimited("slow down", retry_after=7), 429, "7"),
        (BadRequest("prompt too long"), 400, None),
        (Timeout("took too long"), 504, None),
    ],
)
def test_errors_before_the_first_token_are_problem_responses(
    error: LLMBridgeError, status: int, retry_after: str | None
) -> None:
    """Admission errors become application/problem+json with the fitting status and
    Retry-After, for generate(), stream() and sse(), never a 200 with a broken body."""
    app = Flask(__name__)
    bridge = FlaskBridge(app, engine=RefusingSubmitter(error))
    app.add_url_rule("/g", "/g", lambda: bridge.generate("x"))
    app.add_url_rule("/s", "/s", lambda: bridge.sse("x"))
    app.add_url_rule("/t", "/t", lambda: bridge.stream_response("x"))
    client = app.test_client()
    for path in ("/g", "/s", "/t"):
        reply = client.get(path)
        assert reply.status_code == status
        assert reply.content_type == "application/problem+json"
        assert reply.headers.get("Retry-After") == retry_after
        body = reply.json
        assert body["status"] == status
        assert body["detail"] == error.message
        assert body["error"] == type(error).__name__


def test_failure_before_any_text_is_a_problem_response(engine: Any) -> None:
    """A backend failing before its first token gives 502 problem+json, not a 200."""
    app = Flask(__name__)
    bridge = FlaskBridge(app, engine=engine)
    app.add_url_rule("/", "/", lambda: bridge.sse("x", error_after=0))
    reply = app.test_client().get("/")
    assert reply.status_code == 502
    assert reply.json["error"] == "BackendError"


def test_failure_mid_stream_ends_with_an_error_event(app: Flask, engine: Any) -> None:
    """A backend failing after some text ends the SSE body with event: error + JSON."""
    bridge = app.extensions["llmbridge"]
    app.add_url_rule("/fail", "/fail", lambda: bridge.sse("x", error_after=3))
    evs = events(app.test_client().get("/fail").data)
    assert texts(evs) == engine.backend.generator.expected_text("x", 3)
    assert evs[-1].event == "error"
    assert json.loads(evs[-1].data)["status"] == 502


def test_start_timeout_is_a_504_and_cancels_the_job() -> None:
    """No first output within start_timeout: 504 problem, and the job is cancelled."""
    release = threading.Event()
    cancelled = threading.Event()

    def backend(prompt: str) -> Iterator[str]:
        try:
            release.wait(10)
            yield "late"
        except GeneratorExit:
            cancelled.set()
            raise

    app = Flask(__name__)
    with Engine(backend) as engine:
        bridge = FlaskBridge(app, engine=engine, start_timeout=0.1)
        app.add_url_rule("/", "/", lambda: bridge.sse("x"))
        reply = app.test_client().get("/")
        assert reply.status_code == 504
        assert reply.json["error"] == "Timeout"
        release.set()


def test_closing_the_response_cancels_the_job(app: Flask, engine: Any) -> None:
    """The server closing the body after two events (client gone) cancels the engine job."""
    generator = engine.backend.generator
    reply = app.test_client().get("/sse?p=long&n=5000", buffered=False)
    body = iter(reply.response)
    first = [next(body), next(body)]
    assert all(chunk.startswith(b"data: ") for chunk in first)
    reply.close()
    request_id = reply.headers["X-Request-Id"]
    assert wait_until(lambda: request_id in generator.cancelled)
    assert wait_until(lambda: generator.jobs_in_flight == 0)


def test_async_body_extension_gets_the_body(app: Flask, engine: Any) -> None:
    """Under a server offering llmbridge.async_body, the response is what the server's
    hook returned (direct passthrough), and the hook got the StreamBody."""
    handed: list[StreamBody] = []

    class Pumped:
        def __init__(self, body: StreamBody) -> None:
            handed.append(body)

        def __iter__(self) -> Iterator[bytes]:
            return iter([b"pumped by the server"])

    reply = app.test_client().get("/sse?p=x", environ_base={ASYNC_BODY_KEY: Pumped})
    assert reply.data == b"pumped by the server"
    assert len(handed) == 1
    assert handed[0].stream.id == reply.headers["X-Request-Id"]
    assert handed[0].format == "sse"
    handed[0].close()


def test_options_config_and_extension_registry(engine: Any) -> None:
    """LLMBRIDGE_* config is read, keyword options win, the bridge is registered, and
    blueprints reach it through current_app."""
    app = Flask(__name__)
    app.config["LLMBRIDGE_HEARTBEAT"] = 3.0
    app.config["LLMBRIDGE_START_TIMEOUT"] = 9.0
    bridge = FlaskBridge(engine=engine, start_timeout=5.0)
    bridge.init_app(app)
    assert app.extensions["llmbridge"] is bridge
    assert app.config["LLMBRIDGE_HEARTBEAT"] == 3.0
    assert app.config["LLMBRIDGE_START_TIMEOUT"] == 9.0  # config stays the user's
    blueprint = Blueprint("bp", __name__)

    @blueprint.get("/bp")
    def from_blueprint() -> dict[str, str]:
        ext = current_app.extensions["llmbridge"]
        return {"text": ext.generate("bp", max_new_tokens=3)}

    app.register_blueprint(blueprint)
    reply = app.test_client().get("/bp")
    assert reply.json == {"text": engine.backend.generator.expected_text("bp", 3)}
    assert bridge.engine is engine  # outside a context: the only app's engine


def test_bad_configuration_fails_at_construction(engine: Any) -> None:
    """Unknown options and bad values are reported at once; a missing engine when a
    method needs one."""
    with pytest.raises(TypeError, match="unknown FlaskBridge option"):
        FlaskBridge(engine=engine, heartbeats=1)
    with pytest.raises(ValueError, match="heartbeat must be"):
        FlaskBridge(Flask(__name__), engine=engine, heartbeat=-1)
    # No engine is fine (offloading only); what needs one says how to pass it.
    app = Flask(__name__)  # held: a bridge keeps only weak references to its apps
    engineless = FlaskBridge(app)
    with pytest.raises(LLMBridgeError, match=r"no engine: pass one as FlaskBridge\(app, engine="):
        engineless.generate("x")
    with pytest.raises(TypeError, match="submit"):
        FlaskBridge(Flask(__name__), engine=object())  # type: ignore[arg-type]


def test_a_users_own_handler_for_bridge_errors_is_kept(engine: Any) -> None:
    """An app that already handles LLMBridgeError keeps its handler."""
    app = Flask(__name__)

    @app.errorhandler(LLMBridgeError)
    def mine(error: LLMBridgeError) -> tuple[str, int]:
        return "mine", 418

    bridge = FlaskBridge(app, engine=RefusingSubmitter(Overloaded()))
    app.add_url_rule("/", "/", lambda: bridge.generate("x"))
    assert app.test_client().get("/").status_code == 418


def test_to_thread_sees_the_request_and_times_out_as_504(engine: Any) -> None:
    """to_thread runs on a pool thread with the request context; a timeout is 504."""
    app = Flask(__name__)
    bridge = FlaskBridge(app, engine=engine, max_threads=2)
    release = threading.Event()

    @app.get("/where")
    def where() -> dict[str, Any]:
        ident, path = bridge.to_thread(lambda: (threading.get_ident(), request.path))
        return {"other_thread": ident != threading.get_ident(), "path": path}

    @app.get("/slow")
    def slow() -> str:
        bridge.to_thread(release.wait, 10, timeout=0.1)
        return "never"

    client = app.test_client()
    assert client.get("/where").json == {"other_thread": True, "path": "/where"}
    reply = client.get("/slow")
    assert reply.status_code == 504
    assert reply.content_type == "application/problem+json"
    release.set()
