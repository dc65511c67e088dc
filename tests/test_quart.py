"""QuartBridge in process (Quart's test client): generate, stream, sse, errors as
problem+json, offload coroutines, serving hooks."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from quart import Quart, request

from llmbridge import LLMBridgeError, Overloaded, RateLimited
from llmbridge._sansio.sse import SSEDecoder
from llmbridge.quart import QuartBridge
from llmbridge.testing import simulated_engine

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def make_app(**options: Any) -> tuple[Quart, QuartBridge, Any]:
    engine = simulated_engine(step_time=0.001, max_new_tokens=8)
    app = Quart(__name__)
    bridge = QuartBridge(app, engine=engine, heartbeat=None, handle_signals=False, **options)

    @app.post("/complete")
    async def complete() -> dict[str, str]:
        data = await request.get_json()
        return {"text": await bridge.generate(data["prompt"])}

    @app.get("/chunks")
    async def chunks() -> dict[str, list[str]]:
        return {"chunks": [c async for c in bridge.stream(request.args["prompt"])]}

    @app.get("/sse")
    async def sse() -> Any:
        return await bridge.sse(request.args["prompt"])

    @app.get("/overloaded")
    async def overloaded() -> Any:
        raise Overloaded("busy", retry_after=2.5)

    @app.get("/limited")
    async def limited() -> Any:
        raise RateLimited("slow down", retry_after=1)

    return app, bridge, engine


@pytest.fixture
async def served() -> AsyncIterator[tuple[Quart, QuartBridge, Any]]:
    app, bridge, engine = make_app()
    async with app.test_app():  # runs before_serving / after_serving
        yield app, bridge, engine


async def test_generate_stream_and_sse_give_each_prompt_its_own_text(
    served: tuple[Quart, QuartBridge, Any],
) -> None:
    """The three ways to read a completion agree with the generator's expected text."""
    app, _, engine = served
    expected = engine.backend.generator.expected_text
    client = app.test_client()
    response = await client.post("/complete", json={"prompt": "alpha"})
    assert (await response.get_json())["text"] == expected("alpha")
    response = await client.get("/chunks", query_string={"prompt": "beta"})
    assert "".join((await response.get_json())["chunks"]) == expected("beta")
    response = await client.get("/sse", query_string={"prompt": "gamma"})
    assert response.content_type == "text/event-stream"
    got = SSEDecoder().feed(await response.get_data())
    assert "".join(e.json()["text"] for e in got if e.event == "message") == expected("gamma")
    assert got[-1].event == "done"


async def test_serving_hooks_start_and_close_the_engine() -> None:
    """before_serving starts the engine; after_serving closes it."""
    app, _, engine = make_app()
    async with app.test_app():
        assert engine.running
    assert not engine.running


@pytest.mark.parametrize(
    ("path", "status", "retry_after"), [("/overloaded", 503, "3"), ("/limited", 429, "1")]
)
async def test_llmbridge_errors_become_problem_json(
    served: tuple[Quart, QuartBridge, Any], path: str, status: int, retry_after: str
) -> None:
    """Errors raised in views answer application/problem+json with Retry-After."""
    app, _, _ = served
    response = await app.test_client().get(path)
    assert response.status_code == status
    assert response.content_type == "application/problem+json"
    assert response.headers["Retry-After"] == retry_after
    assert (await response.get_json())["status"] == status


async def test_engine_errors_before_output_are_answered_not_streamed(
    served: tuple[Quart, QuartBridge, Any],
) -> None:
    """A closed engine makes sse() raise EngineClosed: a 503 problem, not a broken 200."""
    app, _, engine = served
    await engine.aclose(5)
    response = await app.test_client().get("/sse", query_string={"prompt": "late"})
    assert response.status_code == 503
    assert (await response.get_json())["error"] == "EngineClosed"


async def test_to_thread_and_to_process_are_coroutines() -> None:
    """await bridge.to_thread/to_process run off the loop; decorators work too."""
    import quart_offload

    bridge = QuartBridge(Quart(__name__), engine=simulated_engine(), handle_signals=False)
    name = await bridge.to_thread(lambda: threading.current_thread().name)
    assert name != threading.current_thread().name
    assert (await quart_offload.thread_name("t")).startswith("t:")
    assert (await bridge.to_process(os.getpid)) != os.getpid()
    pid, square = await quart_offload.pid_square(7)
    assert (square, pid != os.getpid()) == (49, True)


async def test_unknown_options_are_refused_and_a_missing_engine_is_explained() -> None:
    """Bad configuration fails at init with a clear message; a missing engine when a
    method needs one."""
    with pytest.raises(TypeError, match="unknown QuartBridge option"):
        QuartBridge(Quart(__name__), engine=simulated_engine(), nope=1)
    app = Quart(__name__)  # held: a bridge keeps only weak references to its apps
    engineless = QuartBridge(app, handle_signals=False)
    with pytest.raises(LLMBridgeError, match=r"no engine: pass one as QuartBridge\(app, engine="):
        await engineless.generate("x")
    with pytest.raises(ValueError, match="heartbeat"):
        QuartBridge(Quart(__name__), engine=simulated_engine(), heartbeat=-1)
