"""FlaskBridge and QuartBridge behave alike: every test runs against both, under real
servers (gunicorn's gthread worker for Flask, hypercorn for Quart) on 127.0.0.1.

The apps are ``tests/bridge_apps.py``: the same routes in both frameworks.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from bridge_apps import SECRET, chunks

from llmbridge import Engine
from llmbridge._sansio.sse import ServerSentEvent, SSEDecoder

from support import PYTHON, Server, free_port, run_server, wait_until

pytestmark = pytest.mark.timeout(90)

SERVERS = {
    "flask": [
        PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-w", "1",
        "-b", "127.0.0.1:{port}", "bridge_apps:flask_app",
    ],
    "quart": [PYTHON, "-m", "hypercorn", "-b", "127.0.0.1:{port}", "bridge_apps:quart_app"],
}  # fmt: skip

VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@pytest.fixture(scope="module", params=sorted(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """Each framework's app with an engine."""
    with run_server(SERVERS[request.param], port=free_port(), ready_timeout=60) as server:
        yield server


@pytest.fixture(scope="module", params=sorted(SERVERS))
def engineless(request: pytest.FixtureRequest) -> Iterator[Server]:
    """Each framework's app whose bridge has no engine: ``FlaskBridge(app)``."""
    env = {"BRIDGE_APPS_ENGINE": "none"}
    with run_server(SERVERS[request.param], port=free_port(), env=env, ready_timeout=60) as s:
        yield s


def sse_events(reply: httpx.Response) -> list[ServerSentEvent]:
    return SSEDecoder().feed(reply.content)


def sse_text(events: list[ServerSentEvent]) -> str:
    return "".join(json.loads(e.data)["text"] for e in events if e.event == "message")


def test_generate_and_sse_carry_the_engines_text_and_id(server: Server) -> None:
    """generate() and sse() answer the backend's text; the SSE response's X-Request-Id
    is the engine request's id (the done event's)."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.get("/generate", params={"p": "alpha", "n": 3})
        assert reply.status_code == 200
        assert reply.json() == {"text": "".join(chunks("alpha")[:3])}
        assert VALID_ID.fullmatch(reply.headers["X-Request-Id"])
        reply = client.get("/sse", params={"p": "beta", "n": 5})
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = sse_events(reply)
        assert sse_text(events) == "".join(chunks("beta")[:5])
        assert events[-1].event == "done"
        assert json.loads(events[-1].data)["id"] == reply.headers["X-Request-Id"]
        assert "X-LLMBridge-Request-Id" not in reply.headers


def test_a_valid_client_request_id_is_the_engines_id(server: Server) -> None:
    """A client's valid X-Request-Id names the engine request: it comes back in the
    header, in the done event and in problem bodies."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sent = "client-7.a:b_C"
        reply = client.get("/sse", params={"p": "x", "n": 2}, headers={"X-Request-Id": sent})
        assert reply.headers["X-Request-Id"] == sent
        assert json.loads(sse_events(reply)[-1].data)["id"] == sent
        reply = client.get("/generate", params={"p": "x"}, headers={"X-Request-Id": sent})
        assert reply.headers["X-Request-Id"] == sent
        failed = client.get(
            "/generate", params={"p": "x", "fail_after": 0}, headers={"X-Request-Id": sent}
        )
        assert failed.status_code == 502
        assert failed.headers["X-Request-Id"] == sent
        assert failed.json()["request_id"] == sent


@pytest.mark.parametrize("sent", ["has space", "a/b", "x" * 129, "", "<script>"])
def test_an_invalid_client_request_id_is_replaced_not_echoed(server: Server, sent: str) -> None:
    """An X-Request-Id outside 1-128 chars of [A-Za-z0-9._:-] is replaced by the engine's
    own id, in the header and in the stream."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.get("/sse", params={"p": "y", "n": 2}, headers={"X-Request-Id": sent})
    got = reply.headers["X-Request-Id"]
    assert got != sent
    assert VALID_ID.fullmatch(got)
    assert json.loads(sse_events(reply)[-1].data)["id"] == got


def log_line_of(server: Server, request_id: str) -> str:
    lines = [line for line in server.log().splitlines() if f"request {request_id} " in line]
    return "\n".join(lines)


def test_backend_text_never_reaches_the_client_of_a_json_502(server: Server) -> None:
    """A backend failing before any text: 502 problem+json with a generic detail and the
    request id; the log line has the id and the backend's full text."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.get("/generate", params={"p": "z", "fail_after": 0})
    assert reply.status_code == 502
    assert reply.headers["content-type"] == "application/problem+json"
    assert SECRET not in reply.text
    assert "hunter2" not in reply.text
    body = reply.json()
    request_id = reply.headers["X-Request-Id"]
    assert body["request_id"] == request_id
    assert body["error"] == "BackendError"
    assert request_id in body["detail"]
    assert wait_until(lambda: SECRET in log_line_of(server, request_id))


def test_backend_text_never_reaches_the_client_mid_stream(server: Server) -> None:
    """A backend failing after two chunks: the SSE body ends with a generic event: error
    carrying the request id; the log line has the id and the backend's full text."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.get("/sse", params={"p": "w", "fail_after": 2})
    assert reply.status_code == 200
    assert SECRET not in reply.text
    assert "hunter2" not in reply.text
    events = sse_events(reply)
    assert sse_text(events) == "".join(chunks("w")[:2])
    assert events[-1].event == "error"
    error = json.loads(events[-1].data)
    request_id = reply.headers["X-Request-Id"]
    assert (error["status"], error["error"], error["request_id"]) == (
        502,
        "BackendError",
        request_id,
    )
    assert wait_until(lambda: SECRET in log_line_of(server, request_id))


def test_an_engineless_bridge_offloads_and_a_timeout_is_a_504(engineless: Server) -> None:
    """FlaskBridge(app) / QuartBridge(app) without an engine: a to_thread call past its
    timeout answers 504 problem+json (with the client's request id)."""
    with httpx.Client(base_url=engineless.url, timeout=30) as client:
        reply = client.get("/offload", headers={"X-Request-Id": "slow-1"})
    assert reply.status_code == 504
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.headers["X-Request-Id"] == "slow-1"
    assert reply.json()["error"] == "Timeout"
    assert reply.json()["request_id"] == "slow-1"


def test_an_engineless_bridge_runs_async_views_on_one_loop(engineless: Server) -> None:
    """Without an engine, async views still run on one long-lived loop per process (for
    Flask: not a new loop per request), so loop-bound clients survive between requests."""
    with httpx.Client(base_url=engineless.url, timeout=30) as client:
        counts = [client.get("/loop").json()["loops"] for _ in range(3)]
    assert counts == [1, 1, 1]


def test_an_engineless_bridge_says_how_to_pass_an_engine(engineless: Server) -> None:
    """A method that needs an engine answers 500 problem+json that says how to pass one."""
    with httpx.Client(base_url=engineless.url, timeout=30) as client:
        reply = client.get("/generate", params={"p": "x"})
    assert reply.status_code == 500
    assert reply.headers["content-type"] == "application/problem+json"
    assert "engine=" in reply.json()["detail"]


@pytest.mark.parametrize(
    ("after", "header", "field"),
    [
        ("inf", "86400", 86400.0),
        ("1e999", "86400", 86400.0),
        ("-inf", "0", 0.0),
        ("nan", None, None),
        ("-5", "0", 0.0),
        ("2.5", "3", 2.5),
    ],
)
def test_retry_after_never_breaks_a_problem_response(
    server: Server, after: str, header: str | None, field: float | None
) -> None:
    """Overloaded with an infinite, NaN or negative retry_after: still a 503
    problem+json; Retry-After is clamped to [0, one day] or left out."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.get("/retry", params={"after": after})
    assert reply.status_code == 503
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.headers.get("Retry-After") == header
    assert reply.json().get("retry_after") == field


def test_a_hostile_error_subclass_is_still_a_problem_response(server: Server) -> None:
    """An LLMBridgeError subclass with status 1000 and a retry_after that is no number
    answers 500 problem+json instead of breaking the error handler."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.get("/hostile")
    assert reply.status_code == 500
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["status"] == 500
    assert "retry_after" not in reply.json()
    assert "Retry-After" not in reply.headers


def test_the_frameworks_own_error_handling_still_works(server: Server) -> None:
    """With the bridge installed, an unknown URL is the framework's 404 and a handler
    the app registers after the bridge (409) answers; views that don't use the bridge
    get no X-Request-Id."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/nowhere").status_code == 404
        reply = client.get("/conflict")
        assert (reply.status_code, reply.json()) == (409, {"handled": "conflict"})
        plain = client.get("/plain", headers={"X-Request-Id": "abc"})
        assert plain.json() == {"plain": True}
        assert "X-Request-Id" not in plain.headers


# -- one bridge, several apps (in process) ----------------------------------------------


def echo(tag: str) -> Any:
    def backend(prompt: str) -> Iterator[str]:
        yield f"{tag}:{prompt}"

    return backend


@pytest.mark.parametrize("framework", ["flask", "quart"])
def test_one_bridge_serves_several_apps_each_with_its_engine(framework: str) -> None:
    """init_app on two apps with two engines: each app's views reach their own engine,
    and the bridge lists both engines."""
    with Engine(echo("one")) as one, Engine(echo("two")) as two:
        if framework == "flask":
            from flask import Flask

            from llmbridge.flask import FlaskBridge

            fbridge = FlaskBridge()
            fapps = [Flask("one"), Flask("two")]
            for app, engine in zip(fapps, (one, two), strict=True):
                fbridge.init_app(app, engine=engine)
                app.add_url_rule("/", "g", lambda: {"text": fbridge.generate("p")})
            got = [app.test_client().get("/").json for app in fapps]
            assert fbridge.engines == [one, two]
        else:
            from quart import Quart

            from llmbridge.quart import QuartBridge

            qbridge = QuartBridge(handle_signals=False)
            qapps = [Quart("one"), Quart("two")]

            async def view() -> dict[str, str]:
                return {"text": await qbridge.generate("p")}

            for app, engine in zip(qapps, (one, two), strict=True):
                qbridge.init_app(app, engine=engine)
                app.add_url_rule("/", "g", view)

            async def main() -> list[Any]:
                return [await (await app.test_client().get("/")).get_json() for app in qapps]

            got = asyncio.run(main())
            assert qbridge.engines == [one, two]
    assert got == [{"text": "one:p"}, {"text": "two:p"}]
