"""Liveness and readiness through real servers: werkzeug and gunicorn (Flask), hypercorn
(Quart), uvicorn with ``llmbridge.asgi`` (Flask under the adapter). Each test kills the
engine's backend, wedges a step, drains, or opens the circuit breaker (``health_apps``)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import PYTHON, Server, free_port, run_server

pytestmark = pytest.mark.slow

FLASK = str(Path(PYTHON).parent / "flask")
SERVERS = {
    "werkzeug": [FLASK, "--app", "health_apps:flask_app", "run", "--port", "{port}", "--no-reload"],
    "gunicorn": [
        PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-w", "1",
        "-b", "127.0.0.1:{port}", "health_apps:flask_app",
    ],
    "hypercorn": [PYTHON, "-m", "hypercorn", "health_apps:quart_app", "-b", "127.0.0.1:{port}"],
    "uvicorn": [
        PYTHON, "-m", "uvicorn", "health_apps:asgi_app",
        "--host", "127.0.0.1", "--port", "{port}", "--no-access-log",
    ],
}  # fmt: skip

SECRETS = ("secret backend text", "Died", "serving loop died")


def serve(name: str, **env: str) -> AbstractContextManager[Server]:
    return run_server(SERVERS[name], port=free_port(), env=env, ready_timeout=60)


def poll(
    client: httpx.Client, path: str, until: Callable[[httpx.Response], bool], timeout: float = 20
) -> httpx.Response:
    """GET ``path`` until ``until(response)``; the last response (the caller asserts)."""
    got = threading.Event()
    response = client.get(path)
    deadline = threading.Timer(timeout, got.set)
    deadline.start()
    try:
        while not until(response) and not got.wait(0.05):
            response = client.get(path)
    finally:
        deadline.cancel()
    return response


def in_background(client: httpx.Client, path: str) -> tuple[threading.Thread, list[Any]]:
    """GET ``path`` on a thread (a request that stays in flight); its outcome in the list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(client.get(path, timeout=60))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def assert_hides_backend_text(response: httpx.Response) -> None:
    for secret in SECRETS:
        assert secret not in response.text


def status_is(code: int) -> Callable[[httpx.Response], bool]:
    return lambda r: r.status_code == code


@pytest.fixture
def werkzeug() -> Iterator[Server]:
    with serve("werkzeug") as server:
        yield server


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", ["werkzeug", "gunicorn"])
def test_flask_is_live_then_ready_once_the_engine_started(name: str) -> None:
    """Before any request the engine has not started: live (nothing went wrong) but the
    readiness probe starts it in the worker, and a request is served after it."""
    with serve(name) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        live = client.get("/livez")
        assert live.status_code == 200
        assert live.headers["content-type"] == "application/json"
        assert live.json() == {"status": "ok", "checks": {"flask-engine": "not started"}}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {
            "flask-engine": "running",
            "draining": False,
            "breaker": "closed",
        }
        assert client.get("/state").json()["running"] is True
        assert client.get("/gen", params={"prompt": "hi"}).json() == {"text": "ttt"}


@pytest.mark.timeout(90)
def test_flask_warmup_gates_readiness() -> None:
    """With ``warmup``, the first probe submits the warm-up request and says not ready;
    once it finished, ready."""
    with (
        serve("werkzeug", HEALTH_WARMUP="warm") as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        first = client.get("/readyz")
        assert first.status_code == 503
        assert first.headers["content-type"] == "application/problem+json"
        assert first.json()["checks"]["flask-engine"] == "warming up"
        assert "warming up" in first.json()["detail"]
        ready = poll(client, "/readyz", status_is(200))
        assert ready.status_code == 200, ready.text
        assert client.get("/state").json()["steps"] >= 1


@pytest.mark.timeout(90)
def test_flask_killed_backend_is_neither_live_nor_ready(werkzeug: Server) -> None:
    """The backend's serving loop dies: /livez and /readyz answer 503 saying the engine
    thread died, with none of the backend's text."""
    with httpx.Client(base_url=werkzeug.url, timeout=10) as client:
        assert client.get("/readyz").status_code == 200
        failed = client.get("/gen", params={"prompt": "kill"})
        assert failed.status_code == 502
        live = client.get("/livez")
        assert live.status_code == 503, live.text
        body = live.json()
        assert body["title"] == "Not live"
        assert body["checks"] == {"flask-engine": "crashed"}
        assert body["reasons"] == ["engine flask-engine: its thread died"]
        assert_hides_backend_text(live)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["flask-engine"] == "crashed"
        assert_hides_backend_text(ready)


@pytest.mark.timeout(90)
def test_gunicorn_wedged_step_is_not_live_until_it_ends() -> None:
    """One step that does not end: within ``stuck_after`` of the first probe that found
    it, /livez says stuck; once the step ends, live again and the request completes."""
    with serve("gunicorn") as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/readyz").status_code == 200
        thread, outcome = in_background(client, "/gen?prompt=wedge")
        stuck = poll(client, "/livez", status_is(503))
        assert stuck.status_code == 503, stuck.text
        assert stuck.json()["checks"] == {"flask-engine": "stuck"}
        assert "one step has run for" in stuck.json()["detail"]
        assert client.get("/readyz").status_code == 503
        assert client.get("/release").status_code == 200
        live = poll(client, "/livez", status_is(200))
        assert live.status_code == 200, live.text
        thread.join(30)
        assert outcome[0].status_code == 200
        assert outcome[0].json() == {"text": "ttt"}


@pytest.mark.timeout(90)
def test_flask_open_breaker_is_live_but_not_ready(werkzeug: Server) -> None:
    """Two failures open the pipeline's breaker: not ready (the load balancer should send
    traffic elsewhere), still live (a restart would not help)."""
    with httpx.Client(base_url=werkzeug.url, timeout=10) as client:
        assert client.get("/readyz").status_code == 200
        for _ in range(2):
            assert client.get("/gen", params={"prompt": "fail"}).status_code == 502
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["breaker"] == "open"
        assert ready.json()["reasons"] == ["the circuit breaker is open: the backend is failing"]
        assert_hides_backend_text(ready)
        assert client.get("/livez").status_code == 200


@pytest.mark.timeout(90)
def test_flask_closing_engine_is_not_ready_under_a_prefix() -> None:
    """``health_prefix`` moves the probes; an engine that began closing is not ready
    (draining), and still live."""
    with (
        serve("werkzeug", HEALTH_PREFIX="/_internal") as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        assert client.get("/readyz").status_code == 404
        assert client.get("/_internal/readyz").status_code == 200
        assert client.get("/close").status_code == 200
        ready = poll(client, "/_internal/readyz", status_is(503))
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["draining"] is True
        assert "draining" in ready.json()["detail"]
        assert client.get("/_internal/livez").status_code == 200


@pytest.mark.timeout(120)
def test_quart_probes_under_hypercorn() -> None:
    """Quart: ready at once (before_serving started the engine); a wedged step is not
    live; a killed backend is not live until a request restarts the engine; an open
    breaker is not ready."""
    with serve("hypercorn") as server, httpx.Client(base_url=server.url, timeout=10) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["quart-engine"] == "running"
        thread, outcome = in_background(client, "/gen?prompt=wedge")
        stuck = poll(client, "/livez", status_is(503))
        assert stuck.json()["checks"] == {"quart-engine": "stuck"}, stuck.text
        client.get("/release")
        assert poll(client, "/livez", status_is(200)).status_code == 200
        thread.join(30)
        assert outcome[0].json() == {"text": "ttt"}

        assert client.get("/gen", params={"prompt": "kill"}).status_code == 502
        dead = client.get("/livez")
        assert dead.status_code == 503
        assert dead.json()["checks"] == {"quart-engine": "crashed"}
        assert_hides_backend_text(dead)

        # The next request starts a fresh engine thread, and fails: with the killed
        # request's failure that is two, which opens the breaker.
        failed = client.get("/gen", params={"prompt": "fail"})
        assert failed.status_code == 502, failed.text
        assert client.get("/gen", params={"prompt": "x"}).status_code == 503
        live = client.get("/livez")
        assert live.status_code == 200
        assert live.json()["checks"] == {"quart-engine": "running"}
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["breaker"] == "open"


@pytest.mark.timeout(120)
def test_quart_draining_is_not_ready_but_live() -> None:
    """Draining with a request in flight (started as the SIGTERM handler starts it): the
    bridge refuses new work with 503, but its probes still answer: /readyz 503
    (draining), /livez 200."""
    with (
        serve("hypercorn", HEALTH_DRAIN="5") as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        assert client.get("/readyz").status_code == 200
        in_background(client, "/gen?prompt=hold")  # in flight until the drain ends
        assert client.get("/drain").status_code == 200
        ready = poll(client, "/readyz", status_is(503))
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["draining"] is True
        assert client.get("/livez").status_code == 200
        assert client.get("/gen", params={"prompt": "x"}).status_code == 503


@pytest.mark.timeout(120)
def test_asgi_adapter_probes_under_uvicorn() -> None:
    """Flask under ``to_asgi`` and uvicorn: ready (lifespan started the engine), a wedged
    step is not live, an open breaker not ready; on SIGTERM the adapter itself refuses
    every request, the readiness probe included, with a problem+json 503."""
    with (
        serve("uvicorn", HEALTH_DRAIN="10") as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["flask-engine"] == "running"
        in_background(client, "/gen?prompt=hold")  # in flight until the drain ends
        thread, outcome = in_background(client, "/gen?prompt=wedge")
        stuck = poll(client, "/livez", status_is(503))
        assert stuck.json()["checks"] == {"flask-engine": "stuck"}, stuck.text
        client.get("/release")
        assert poll(client, "/livez", status_is(200)).status_code == 200
        thread.join(30)
        assert outcome[0].json() == {"text": "ttt"}

        for _ in range(2):
            assert client.get("/gen", params={"prompt": "fail"}).status_code == 502
        broken = client.get("/readyz")
        assert broken.status_code == 503
        assert broken.json()["checks"]["breaker"] == "open"

        server.proc.send_signal(signal.SIGTERM)
        refused = poll(client, "/readyz", lambda r: "shutting down" in r.text)
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
