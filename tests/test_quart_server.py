"""QuartBridge under a real hypercorn on 127.0.0.1: isolated streams longer than
RESPONSE_TIMEOUT, disconnect cancels, SIGTERM ends streams with a final event."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from llmbridge._sansio.sse import ServerSentEvent, SSEDecoder
from llmbridge.testing import SimulatedGenerator

from support import PYTHON, Server, free_port, run_server, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

EXPECTED = SimulatedGenerator()


@pytest.fixture
def shutdown_file(tmp_path: Path) -> Path:
    return tmp_path / "shutdown.log"


@pytest.fixture
def hypercorn(shutdown_file: Path) -> Iterator[Server]:
    args = [PYTHON, "-m", "hypercorn", "quart_apps:app", "-w", "0", "-b", "127.0.0.1:{port}"]
    env = {"QUART_TEST_SHUTDOWN_FILE": str(shutdown_file), "QUART_TEST_DRAIN": "1"}
    with run_server(args, port=free_port(), env=env, ready_timeout=60) as server:
        yield server


def read_text(path: Path) -> str:
    return path.read_text()


@pytest.mark.timeout(60)
async def test_streams_are_isolated_and_outlive_response_timeout(hypercorn: Server) -> None:
    """24 streams of 150 tokens (> 1 s, the app's RESPONSE_TIMEOUT) each get their own text."""
    results: dict[str, list[ServerSentEvent]] = {}
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(i: int) -> None:
            decoder = SSEDecoder()
            got: list[ServerSentEvent] = []
            async with client.stream("GET", f"{hypercorn.url}/sse?prompt=q{i}&n=150") as r:
                assert r.status_code == 200
                async for chunk in r.aiter_bytes():
                    got.extend(decoder.feed(chunk))
            results[f"q{i}"] = got

        async with anyio.create_task_group() as tg:
            for i in range(24):
                tg.start_soon(one, i)
    for prompt, got in results.items():
        text = "".join(e.json()["text"] for e in got if e.event == "message")
        assert text == EXPECTED.expected_text(prompt, 150)
        assert got[-1].event == "done"


@pytest.mark.timeout(60)
async def test_disconnect_cancels_the_job(hypercorn: Server) -> None:
    """A client that leaves after 2 events has its job cancelled in the engine."""
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", f"{hypercorn.url}/sse?prompt=gone&n=100000") as r:
            job = r.headers["x-request-id"]
            decoder = SSEDecoder()
            seen = 0
            async for chunk in r.aiter_bytes():
                seen += len(decoder.feed(chunk))
                if seen >= 2:
                    break
        for _ in range(200):
            state = (await client.get(f"{hypercorn.url}/stats")).json()
            if job in state["cancelled"]:
                break
            await anyio.sleep(0.05)
        assert job in state["cancelled"]
        assert state["in_flight"] == 0


@pytest.mark.timeout(60)
async def test_sigterm_ends_the_stream_with_a_final_event(
    hypercorn: Server, shutdown_file: Path
) -> None:
    """SIGTERM mid-stream: event: error (EngineClosed), a clean end, after_serving runs."""
    got: list[ServerSentEvent] = []
    async with httpx.AsyncClient(timeout=30) as client:
        decoder = SSEDecoder()
        async with client.stream("GET", f"{hypercorn.url}/sse?prompt=term&n=100000") as r:
            async for chunk in r.aiter_bytes():
                got.extend(decoder.feed(chunk))
                if len(got) == 1:
                    hypercorn.proc.send_signal(signal.SIGTERM)
    assert got[-1].event == "error"
    assert got[-1].json()["error"] == "EngineClosed"
    hypercorn.proc.wait(20)
    assert wait_until(shutdown_file.exists, 5)
    assert "engine_running=False" in read_text(shutdown_file)
