"""The Flask example app under real servers: werkzeug threaded and gunicorn workers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from llmbridge._sansio.sse import SSEDecoder
from llmbridge.testing import SimulatedGenerator

from support import PYTHON, Server, free_port, run_server

APP = "examples.flask_app:create_app()"
# The `flask` console script, as users run it. (Not `python -m flask`: anyio's worker
# processes re-run the parent's __main__ by path, which fails for a package's
# __main__ with relative imports, so to_process can't start workers under it.)
FLASK = str(Path(PYTHON).parent / "flask")
ENV = {"FLASK_EXAMPLE_STEP_TIME": "0.004", "FLASK_LLMBRIDGE_HEARTBEAT": "0.5"}

SERVERS = {
    "werkzeug": [FLASK, "--app", APP, "run", "--port", "{port}", "--no-reload"],
    "gunicorn-gthread": [
        PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "48", "-w", "1",
        "-b", "127.0.0.1:{port}", APP,
    ],
}  # fmt: skip


@pytest.fixture(params=sorted(SERVERS), scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with run_server(SERVERS[request.param], port=free_port(), env=ENV) as server:
        yield server


async def read_sse(client: httpx.AsyncClient, prompt: str, tokens: int) -> tuple[str, dict]:
    decoder = SSEDecoder()
    text: list[str] = []
    done: dict = {}
    params = {"prompt": prompt, "max_tokens": tokens}
    async with client.stream("GET", "/v1/stream", params=params) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "text/event-stream"
        async for chunk in reply.aiter_bytes():
            for event in decoder.feed(chunk):
                if event.event == "message":
                    text.append(json.loads(event.data)["text"])
                elif event.event == "done":
                    done = json.loads(event.data)
                else:
                    raise AssertionError(f"unexpected event {event}")
    return "".join(text), done


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_32_concurrent_sse_clients_each_get_their_own_tokens(server: Server) -> None:
    """32 SSE clients at once through one SimulatedGenerator engine: each stream is
    exactly its own prompt's text, and the generator was never entered concurrently."""
    generator = SimulatedGenerator()
    prompts = [f"client {n}: tell me something" for n in range(32)]
    results: dict[str, tuple[str, dict]] = {}

    async def main() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:

            async def one(prompt: str) -> None:
                results[prompt] = await read_sse(client, prompt, 40)

            async with anyio.create_task_group() as tg:
                for prompt in prompts:
                    tg.start_soon(one, prompt)

    anyio.run(main)
    for prompt in prompts:
        text, done = results[prompt]
        assert text == generator.expected_text(prompt, 40), prompt
        assert done["usage"]["completion_tokens"] == 40
    stats = httpx.get(f"{server.url}/stats").json()["generator"]
    assert stats["concurrent_entries"] == 0
    assert stats["max_batch_seen"] > 1  # they really ran together


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_client_disconnect_after_two_events_cancels_the_job(server: Server) -> None:
    """A client that leaves after 2 events has its job cancelled in the engine."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        params = {"prompt": "a very long story", "max_tokens": 4000}
        with client.stream("GET", "/v1/stream", params=params) as reply:
            request_id = reply.headers["x-request-id"]
            decoder = SSEDecoder()
            seen = 0
            for chunk in reply.iter_bytes():
                seen += sum(e.event == "message" for e in decoder.feed(chunk))
                if seen >= 2:
                    break
        # Leaving the block closed the connection mid-stream.
        deadline = time.monotonic() + 30
        stats: dict = {}
        while time.monotonic() < deadline:
            stats = client.get("/stats").json()["generator"]
            if request_id in stats["cancelled"] and stats["jobs_in_flight"] == 0:
                break
            time.sleep(0.05)
    assert request_id in stats["cancelled"]
    assert stats["jobs_in_flight"] == 0


@pytest.mark.timeout(60)
def test_json_endpoints_errors_and_offload(server: Server) -> None:
    """The example's JSON endpoint, its 400s for bad input, and the process-offloaded
    GIL-holding call, all answered with JSON under a real server."""
    generator = SimulatedGenerator()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.post("/v1/complete", json={"prompt": "hello", "max_tokens": 5})
        assert reply.status_code == 200
        assert reply.json()["text"] == generator.expected_text("hello", 5)
        bad = [
            client.post("/v1/complete", content=b"{not json"),
            client.post("/v1/complete", json={"max_tokens": 5}),
            client.post("/v1/complete", json={"prompt": "x", "max_tokens": "many"}),
            client.post("/v1/complete", json=["prompt"]),
            client.get("/v1/stream"),
        ]
        for reply in bad:
            assert reply.status_code == 400, reply.text
            assert reply.headers["content-type"] == "application/problem+json"
            assert reply.json()["detail"]
        assert client.get("/v1/nowhere").headers["content-type"] == "application/problem+json"
        assert client.post("/v1/tokens", json={"text": "one two three"}).json() == {"tokens": 3}


@pytest.mark.timeout(60)
def test_gunicorn_sync_worker_streams_and_offloads() -> None:
    """gunicorn's sync worker (forked, one request at a time) streams SSE and offloads
    to a process from the forked worker."""
    args = [PYTHON, "-m", "gunicorn", "-k", "sync", "-w", "2", "--preload"]
    args += ["-b", "127.0.0.1:{port}", APP]
    generator = SimulatedGenerator()
    with run_server(args, port=free_port(), env=ENV) as server:

        async def main() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                text, done = await read_sse(client, "sync worker", 12)
                assert text == generator.expected_text("sync worker", 12)
                assert done["finish_reason"] == "length"
                reply = await client.post("/v1/tokens", json={"text": "a b"})
                assert reply.json() == {"tokens": 2}

        anyio.run(main)
