"""The probes' options and states, through Flask's and Quart's test clients (the real
servers are in ``test_health_servers``)."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from quart import Quart

from llmbridge import Engine
from llmbridge._core.jobs import JobQueue
from llmbridge._web.health import Health
from llmbridge.flask import FlaskBridge
from llmbridge.quart import QuartBridge

from support import wait_until


def echo(prompt: str, **params: Any) -> str:
    return prompt


@pytest.mark.timeout(30)
def test_health_false_installs_no_routes() -> None:
    """``health=False`` turns both probes off (the app's 404)."""
    with Engine(echo) as engine:
        app = Flask(__name__)
        FlaskBridge(app, engine=engine, health=False)
        client = app.test_client()
        assert client.get("/livez").status_code == 404
        assert client.get("/readyz").status_code == 404


@pytest.mark.timeout(30)
def test_paths_and_prefix_are_configurable_by_config() -> None:
    """The paths come from options or ``LLMBRIDGE_*`` config, under ``health_prefix``."""
    with Engine(echo) as engine:
        app = Flask(__name__)
        app.config["LLMBRIDGE_HEALTH_PREFIX"] = "/ops"
        FlaskBridge(app, engine=engine, liveness_path="/alive", readiness_path="/ready")
        client = app.test_client()
        assert client.get("/ops/ready").status_code == 200  # and it started the engine
        assert client.get("/ops/alive").json == {"status": "ok", "checks": {engine.name: "running"}}
        assert client.get("/livez").status_code == 404


@pytest.mark.parametrize(
    "options",
    [
        {"health": "yes"},
        {"health_prefix": "ops"},
        {"health_prefix": "/ops/"},
        {"liveness_path": "livez"},
        {"readiness_path": "/"},
        {"stuck_after": 0},
        {"stuck_after": float("inf")},
        {"warmup": 3},
        {"priority_levels": 1},
        {"priority_levels": True},
    ],
)
def test_bad_options_raise(options: dict[str, Any]) -> None:
    """Bad health and priority options raise ValueError when the bridge is made."""
    with pytest.raises(ValueError, match=next(iter(options))):
        FlaskBridge(Flask(__name__), **options)


class ReturnsEarly:
    """A backend whose serving loop returns while the engine still runs."""

    def serve(self, jobs: JobQueue) -> None:
        return None


@pytest.mark.timeout(30)
def test_a_serving_loop_that_returned_is_not_live() -> None:
    """An engine thread that ended without being closed serves nothing: not live."""
    engine = Engine(ReturnsEarly()).start()
    assert engine.thread is not None
    engine.thread.join(10)
    status, body = Health(engine).live()
    assert status == 503
    assert body["checks"] == {engine.name: "dead"}
    engine.close()


class FailsOnce:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompt: str, **params: Any) -> str:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("cold")
        return "warm"


@pytest.mark.timeout(30)
def test_a_failed_warmup_is_retried_by_the_next_probe() -> None:
    """The warm-up request failing keeps the app not ready; a later probe submits it
    again, and its success makes the app ready."""
    backend = FailsOnce()
    with Engine(backend) as engine:
        health = Health(engine, warmup="hello")
        status, body = health.ready()
        assert status == 503
        assert body["checks"][engine.name] == "warming up"
        assert wait_until(lambda: health.ready()[0] == 200)
        assert backend.calls == 2


def test_a_submitter_without_engine_or_breaker_is_ready() -> None:
    """Only engines have a heartbeat and only pipelines a breaker: other submitters add
    no checks (and no reasons)."""

    class Remote:
        def submit(self, prompt: str, /, **params: Any) -> Any:
            raise NotImplementedError

    health = Health(Remote())
    assert health.live() == (200, {"status": "ok", "checks": {}})
    assert health.ready() == (200, {"status": "ok", "checks": {"draining": False}})


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_quart_probes_are_coroutines_and_answer_json() -> None:
    """QuartBridge installs the same probes as async views."""
    with Engine(echo) as engine:
        app = Quart(__name__)
        QuartBridge(app, engine=engine, handle_signals=False)
        async with app.test_app():
            client = app.test_client()
            live = await client.get("/livez")
            assert live.status_code == 200
            assert live.headers["content-type"] == "application/json"
            ready = await client.get("/readyz")
            assert (await ready.get_json())["checks"][engine.name] == "running"
