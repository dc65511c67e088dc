"""Stress through real servers: thousands of requests from several event loops at once.

The Flask example app on the simulated engine, under gunicorn gthread (a WSGI thread per
request) and under uvicorn with llmbridge.asgi (streams on the loop). A fifth of the SSE
clients hang up early at random. Every stream that ran to its end must carry exactly its
own prompt's text; afterwards nothing may be left in flight and the server's threads
must be back within their bounds.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from llmbridge._sansio.sse import SSEDecoder
from llmbridge.testing import SimulatedGenerator

from support import PYTHON, Server, free_port, run_server, wait_until

APP = "examples.flask_app:create_app()"
ENV = {"FLASK_EXAMPLE_STEP_TIME": "0.001", "FLASK_LLMBRIDGE_HEARTBEAT": "5"}
SERVERS = {
    "gunicorn-gthread": [
        PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "32", "-w", "1",
        "--backlog", "2048", "-b", "127.0.0.1:{port}", APP,
    ],
    "uvicorn-llmbridge.asgi": [
        PYTHON, "-m", "uvicorn", "examples.asgi_app:app",
        "--host", "127.0.0.1", "--port", "{port}", "--no-access-log", "--backlog", "2048",
    ],
}  # fmt: skip
LOOPS = 4
PER_LOOP = 500  # 2,000 requests per server
CONCURRENCY = 25  # per loop: 100 in flight at once


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


@pytest.fixture(params=sorted(SERVERS), scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with run_server(SERVERS[request.param], port=free_port(), env=ENV) as server:
        yield server


async def sse(client: httpx.AsyncClient, prompt: str, tokens: int, hang_up: int | None) -> str:
    decoder = SSEDecoder()
    text: list[str] = []
    params = {"prompt": prompt, "max_tokens": tokens}
    async with client.stream("GET", "/v1/stream", params=params) as reply:
        assert reply.status_code == 200, await reply.aread()
        events = 0
        async for chunk in reply.aiter_bytes():
            for event in decoder.feed(chunk):
                if event.event == "message":
                    text.append(json.loads(event.data)["text"])
                    events += 1
                    if hang_up is not None and events >= hang_up:
                        return ""  # leaving the block closes the connection mid-stream
                elif event.event == "done":
                    return "".join(text)
                else:
                    raise AssertionError(f"unexpected event {event}")
    raise AssertionError("the stream ended without its final event")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_thousands_of_requests_with_random_hang_ups(server: Server) -> None:
    """2,000 mixed SSE and JSON requests from 4 loops: exact texts, nothing left behind."""
    generator = SimulatedGenerator()  # only for expected_text
    errors: list[BaseException] = []
    finished: dict[str, str] = {}
    lock = threading.Lock()

    def run_loop(loop_index: int) -> None:
        rng = random.Random(loop_index)
        plan = []
        for i in range(PER_LOOP):
            prompt = f"loop {loop_index} request {i}"
            kind = "json" if rng.random() < 0.25 else "sse"
            hang_up = rng.randrange(1, 4) if kind == "sse" and rng.random() < 0.2 else None
            plan.append((prompt, kind, 8 + rng.randrange(8), hang_up))

        async def main() -> None:
            limits = httpx.Limits(max_connections=CONCURRENCY)
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
                semaphore = anyio.Semaphore(CONCURRENCY)

                async def one(prompt: str, kind: str, tokens: int, hang_up: int | None) -> None:
                    async with semaphore:
                        if kind == "json":
                            body = {"prompt": prompt, "max_tokens": tokens}
                            reply = await client.post("/v1/complete", json=body)
                            assert reply.status_code == 200, reply.text
                            text = reply.json()["text"]
                        else:
                            text = await sse(client, prompt, tokens, hang_up)
                            if hang_up is not None:
                                return
                    with lock:
                        finished[f"{prompt}|{tokens}"] = text

                async with anyio.create_task_group() as tg:
                    for step in plan:
                        tg.start_soon(one, *step)

        try:
            anyio.run(main)
        except BaseException as exc:
            errors.append(exc)

    threads_before = thread_count(server.proc.pid)
    loops = [threading.Thread(target=run_loop, args=(n,)) for n in range(LOOPS)]
    for t in loops:
        t.start()
    for t in loops:
        t.join(200)
    assert not errors, errors[:3]
    assert len(finished) > LOOPS * PER_LOOP * 0.75
    for key, text in finished.items():
        prompt, tokens = key.rsplit("|", 1)
        assert text == generator.expected_text(prompt, int(tokens)), prompt

    def settled() -> bool:
        stats = httpx.get(f"{server.url}/stats", timeout=10).json()
        return bool(stats["generator"]["jobs_in_flight"] == 0)

    assert wait_until(settled, timeout=30)
    stats = httpx.get(f"{server.url}/stats", timeout=10).json()
    assert stats["generator"]["concurrent_entries"] == 0
    assert stats["generator"]["enqueued"] >= LOOPS * PER_LOOP
    assert stats["generator"]["cancelled"], "hung-up clients must cancel their jobs"
    # Threads: bounded by the server's pool whatever the load was.
    assert thread_count(server.proc.pid) <= max(threads_before, 40)
