"""The Flask and Quart bridges take a policy Pipeline in place of an engine."""

from __future__ import annotations

import pytest
from flask import Flask, request

from llmbridge.flask import FlaskBridge
from llmbridge.policies import Pipeline, RateLimit
from llmbridge.testing import SimulatedGenerator, simulated_engine

pytestmark = pytest.mark.timeout(60)


def limited_pipeline() -> tuple[Pipeline, SimulatedGenerator]:
    engine = simulated_engine(step_time=0.001, max_new_tokens=4)
    limit = RateLimit(requests_per_minute=2, key=lambda req: "one client")
    return Pipeline(engine, rate_limit=limit, cache="memory"), engine.backend.generator


def test_flask_bridge_over_a_pipeline_answers_429_problem_json() -> None:
    """Over the limit, Flask views answer 429 + Retry-After as problem+json; SSE too."""
    pipeline, gen = limited_pipeline()
    app = Flask(__name__)
    bridge = FlaskBridge(app, engine=pipeline)

    @app.post("/complete")
    def complete() -> dict[str, str]:
        return {"text": bridge.generate(request.json["prompt"], temperature=0)}

    @app.get("/sse")
    def sse() -> object:
        return bridge.sse(request.args["prompt"])

    client = app.test_client()
    try:
        first = client.post("/complete", json={"prompt": "same"})
        assert first.status_code == 200
        assert first.json == {"text": gen.expected_text("same", 4)}
        # The limit comes first in the pipeline: a cache hit still spends a request.
        second = client.post("/complete", json={"prompt": "same"})
        assert second.json == first.json
        assert gen.enqueued == 1  # served from the cache
        refused = client.get("/sse?prompt=third")
        assert refused.status_code == 429
        assert refused.content_type == "application/problem+json"
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json["status"] == 429
    finally:
        bridge.close()


@pytest.mark.anyio
async def test_quart_bridge_over_a_pipeline_answers_429_problem_json() -> None:
    """The Quart bridge maps the pipeline's RateLimited the same way."""
    from quart import Quart

    from llmbridge.quart import QuartBridge

    pipeline, gen = limited_pipeline()
    app = Quart(__name__)
    bridge = QuartBridge(app, engine=pipeline)

    @app.get("/complete/<prompt>")
    async def complete(prompt: str) -> dict[str, str]:
        return {"text": await bridge.generate(prompt)}

    async with app.test_app():
        client = app.test_client()
        ok = await client.get("/complete/a")
        assert await ok.get_json() == {"text": gen.expected_text("a", 4)}
        assert (await client.get("/complete/b")).status_code == 200
        refused = await client.get("/complete/c")
        assert refused.status_code == 429
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert "Retry-After" in refused.headers
