"""The documented deploys: examples/gunicorn.conf.py with uvicorn-worker (2 workers,
--preload) serving the Flask example through llmbridge.asgi, and the Quart example."""

from __future__ import annotations

import httpx
import pytest

from llmbridge._sansio.sse import SSEDecoder

from support import PYTHON, free_port, run_server

pytestmark = [pytest.mark.slow]


def gunicorn(app: str) -> list[str]:
    return [
        PYTHON, "-m", "gunicorn", "-c", "examples/gunicorn.conf.py",
        "-b", "127.0.0.1:{port}", app,
    ]  # fmt: skip


@pytest.mark.timeout(90)
def test_flask_example_under_gunicorn_uvicorn_worker() -> None:
    """The Flask example streams under the documented command and shuts down cleanly."""
    port = free_port()
    env = {
        "LLMBRIDGE_DRAIN_TIMEOUT": "2",
        # /v1/answer fetches its context from the app's own /kb.
        "FLASK_EXAMPLE_RETRIEVAL_URL": f"http://127.0.0.1:{port}/kb",
    }
    with run_server(gunicorn("examples.asgi_app:app"), port=port, env=env) as server:
        with httpx.Client(timeout=30) as client:
            assert client.get(f"{server.url}/healthz").status_code == 200
            response = client.post(f"{server.url}/v1/stream", json={"prompt": "hi"})
            assert response.status_code == 200, response.text
            events = SSEDecoder().feed(response.content)
            assert events[-1].event == "done"
            # An async def view that reads its JSON body (it runs on the bridge's loop).
            answer = client.post(f"{server.url}/v1/answer", json={"question": "what is up?"})
            assert answer.status_code == 200, answer.text
            bad = client.post(f"{server.url}/v1/stream", content=b"{not json")
            assert bad.status_code == 400
            assert bad.headers["content-type"] == "application/problem+json"
        assert server.terminate(30) == 0
        assert server.log().count("engines closed, bye") == 2, server.log()


@pytest.mark.timeout(90)
def test_quart_example_under_gunicorn_uvicorn_worker() -> None:
    """The Quart example: same conf, same command, streams and 400s as problem+json."""
    env = {"LLMBRIDGE_DRAIN_TIMEOUT": "2"}
    with run_server(gunicorn("examples.quart_app:app"), port=free_port(), env=env) as server:
        with httpx.Client(timeout=30) as client:
            response = client.post(f"{server.url}/stream", json={"prompt": "hi"})
            assert response.status_code == 200, response.text
            assert SSEDecoder().feed(response.content)[-1].event == "done"
            bad = client.post(f"{server.url}/complete", json={"prompt": 3})
            assert bad.status_code == 400
            assert bad.headers["content-type"] == "application/problem+json"
        assert server.terminate(30) == 0
