"""llmbridge.asgi under real servers on 127.0.0.1: uvicorn, and gunicorn with
uvicorn-worker (2 workers, --preload). Streams, disconnects, thread count, SIGTERM."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from llmbridge._sansio.sse import ServerSentEvent, SSEDecoder
from llmbridge.testing import SimulatedGenerator

from support import PYTHON, Server, free_port, run_server, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

EXPECTED = SimulatedGenerator()


def uvicorn_args() -> list[str]:
    # The asyncio loop, whether or not uvloop is installed: uvloop's libuv keeps a pool of
    # its own threads, which the thread-count tests would count as ours.
    return [
        PYTHON, "-m", "uvicorn", "asgi_apps:app", "--loop", "asyncio",
        "--host", "127.0.0.1", "--port", "{port}", "--no-access-log",
    ]  # fmt: skip


def gunicorn_args() -> list[str]:
    return [
        PYTHON, "-m", "gunicorn", "asgi_apps:app",
        "-k", "uvicorn_worker.UvicornWorker", "-w", "2", "--preload",
        "-b", "127.0.0.1:{port}", "--graceful-timeout", "20",
    ]  # fmt: skip


@pytest.fixture
def shutdown_file(tmp_path: Path) -> Path:
    return tmp_path / "shutdown.log"


@pytest.fixture
def uvicorn(shutdown_file: Path) -> Iterator[Server]:
    env = {"ASGI_TEST_SHUTDOWN_FILE": str(shutdown_file), "ASGI_TEST_WORKERS": "4"}
    with run_server(uvicorn_args(), port=free_port(), env=env, ready_timeout=60) as server:
        yield server


async def read_sse(
    client: httpx.AsyncClient, url: str, *, stop_after: int | None = None
) -> tuple[list[ServerSentEvent], httpx.Response]:
    decoder = SSEDecoder()
    got: list[ServerSentEvent] = []
    async with client.stream("GET", url) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_bytes():
            got.extend(decoder.feed(chunk))
            if stop_after is not None and len(got) >= stop_after:
                break
    return got, response


def text_of(got: list[ServerSentEvent]) -> str:
    return "".join(e.json()["text"] for e in got if e.event == "message")


async def stats(client: httpx.AsyncClient, base: str) -> Any:
    return (await client.get(f"{base}/stats")).json()


def read_text(path: Path) -> str:
    return path.read_text()


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


@pytest.mark.timeout(60)
async def test_uvicorn_streams_are_correct_and_isolated(uvicorn: Server) -> None:
    """32 concurrent SSE clients each get exactly their own prompt's tokens."""
    results: dict[str, list[ServerSentEvent]] = {}
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(i: int) -> None:
            results[f"p{i}"], _ = await read_sse(client, f"{uvicorn.url}/sse?prompt=p{i}&n=20")

        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(one, i)
    for prompt, got in results.items():
        assert text_of(got) == EXPECTED.expected_text(prompt, 20)
        assert got[-1].event == "done"


@pytest.mark.timeout(60)
async def test_uvicorn_disconnect_cancels_the_job_and_closes_once(uvicorn: Server) -> None:
    """A client leaving after 2 events cancels its job; the body is closed exactly once."""
    async with httpx.AsyncClient(timeout=30) as client:
        url = f"{uvicorn.url}/counted?prompt=leaving&n=100000"
        async with client.stream("GET", url) as response:
            job = response.headers["x-llmbridge-request-id"]
            decoder = SSEDecoder()
            seen = 0
            async for chunk in response.aiter_bytes():
                seen += len(decoder.feed(chunk))
                if seen >= 2:
                    break
        done = await client.get(f"{uvicorn.url}/counted?prompt=finishing&n=5")
        finished = done.headers["x-llmbridge-request-id"]
        for _ in range(200):
            state = await stats(client, uvicorn.url)
            if job in state["cancelled"] and state["closes"].get(job) == 1:
                break
            await anyio.sleep(0.05)
        assert job in state["cancelled"]
        assert state["closes"][job] == 1
        assert state["closes"][finished] == 1
        assert state["in_flight"] == 0


@pytest.mark.timeout(90)
async def test_uvicorn_100_open_streams_use_only_the_pool(uvicorn: Server) -> None:
    """100 streams open at once: the process's thread count stays at the pool size."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
        pid = (await stats(client, uvicorn.url))["pid"]
        all_open = anyio.Event()
        opened = 0
        peak = 0

        async def one(i: int) -> None:
            nonlocal opened
            url = f"{uvicorn.url}/sse?prompt=t{i}&n=100000"
            async with client.stream("GET", url) as response:
                # Keep the iterator referenced: a dropped one is finalised, which closes
                # the response (a disconnect).
                chunks = response.aiter_bytes()
                await chunks.__anext__()
                opened += 1
                if opened == 100:
                    all_open.set()
                await all_open.wait()
                # Stay open until the thread count was read.
                await done.wait()
                await chunks.aclose()

        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
            await all_open.wait()
            for _ in range(5):
                peak = max(peak, threads_of(pid))
                await anyio.sleep(0.05)
            assert (await stats(client, uvicorn.url))["in_flight"] == 100
            done.set()
    # main thread + the engine thread + the 4 pool threads (one of them served /stats).
    assert peak <= 4 + 2, f"{peak} threads for 100 streams"


@pytest.mark.timeout(60)
async def test_uvicorn_sigterm_ends_streams_with_a_final_event(
    uvicorn: Server, shutdown_file: Path
) -> None:
    """SIGTERM mid-stream: the client gets event: error and a clean end; hooks run."""
    async with httpx.AsyncClient(timeout=30) as client:
        decoder = SSEDecoder()
        got: list[ServerSentEvent] = []
        url = f"{uvicorn.url}/sse?prompt=sigterm&n=100000"
        async with client.stream("GET", url) as response:
            async for chunk in response.aiter_bytes():
                got.extend(decoder.feed(chunk))
                if got and uvicorn.proc.poll() is None and len(got) == 1:
                    uvicorn.proc.send_signal(signal.SIGTERM)
        # No RemoteProtocolError above: the chunked body ended properly.
    assert got[-1].event == "error"
    assert got[-1].json()["error"] == "EngineClosed"
    assert got[-1].json()["status"] == 503
    assert uvicorn.proc.wait(20) is not None
    assert wait_until(lambda: shutdown_file.exists(), 5)
    assert read_text(shutdown_file).startswith("shutdown ")


@pytest.mark.timeout(90)
async def test_gunicorn_preload_two_workers_stream_and_drain_on_sigterm(
    shutdown_file: Path,
) -> None:
    """gunicorn -k uvicorn_worker.UvicornWorker -w 2 --preload: each worker runs its own
    engine; SIGTERM to the master ends open streams with a final event in time, and
    every worker's shutdown hook runs."""
    env = {"ASGI_TEST_SHUTDOWN_FILE": str(shutdown_file), "ASGI_TEST_DRAIN": "1"}
    with run_server(gunicorn_args(), port=free_port(), env=env, ready_timeout=60) as server:
        async with httpx.AsyncClient(timeout=30) as client:
            results: dict[str, list[ServerSentEvent]] = {}

            async def one(i: int) -> None:
                results[f"g{i}"], _ = await read_sse(client, f"{server.url}/sse?prompt=g{i}&n=12")

            async with anyio.create_task_group() as tg:
                for i in range(16):
                    tg.start_soon(one, i)
            for prompt, got in results.items():
                assert text_of(got) == EXPECTED.expected_text(prompt, 12)

            final: list[ServerSentEvent] = []
            decoder = SSEDecoder()
            async with client.stream("GET", f"{server.url}/sse?prompt=long&n=100000") as resp:
                async for chunk in resp.aiter_bytes():
                    final.extend(decoder.feed(chunk))
                    if len(final) == 1:
                        server.proc.send_signal(signal.SIGTERM)
        assert final[-1].event == "error"
        assert final[-1].json()["error"] == "EngineClosed"
        assert server.proc.wait(30) == 0
        lines = read_text(shutdown_file).split()
        assert lines.count("shutdown") == 2, server.log()


BODIES: list[tuple[str, dict[str, Any], Any]] = [
    ("get_json", {"json": {"a": [1, 2], "b": "é"}}, {"a": [1, 2], "b": "é"}),
    ("json", {"json": {"x": 1}}, {"x": 1}),
    ("form", {"data": {"name": "ada", "lang": "py"}}, {"name": "ada", "lang": "py"}),
    ("files", {"files": {"doc": ("a.txt", b"file body")}}, {"doc": "file body"}),
    ("data", {"content": b"raw bytes " * 1000}, "raw bytes " * 1000),
    ("get_data", {"content": b"plain"}, "plain"),
    ("stream", {"content": b"streamed " * 20_000}, "streamed " * 20_000),
]


@pytest.mark.timeout(60)
async def test_uvicorn_every_body_accessor_works_in_sync_and_async_views(
    uvicorn: Server,
) -> None:
    """request.get_json/json/form/files/data/get_data/stream.read from a sync view and from
    an async def view (which runs on the bridge's loop thread, no anyio worker): all
    read the whole body; none is a 500."""
    async with httpx.AsyncClient(timeout=30) as client:
        for accessor, kwargs, expected in BODIES:
            for kind in ("body", "abody"):
                response = await client.post(f"{uvicorn.url}/{kind}/{accessor}", **kwargs)
                assert response.status_code == 200, (kind, accessor, response.text)
                assert response.json()["got"] == expected, (kind, accessor)
    assert "NoEventLoopError" not in uvicorn.log()


@pytest.mark.timeout(60)
async def test_uvicorn_sigterm_ends_a_body_over_an_engine_the_adapter_doesnt_know(
    uvicorn: Server,
) -> None:
    """A StreamBody over an engine nobody told the adapter about, iterated on the worker
    thread (a wrapping middleware): SIGTERM still ends it with its final event at the
    drain deadline, and the server exits."""
    async with httpx.AsyncClient(timeout=30) as client:
        decoder = SSEDecoder()
        got: list[ServerSentEvent] = []
        async with client.stream("GET", f"{uvicorn.url}/unknown?prompt=u") as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                got.extend(decoder.feed(chunk))
                if len(got) == 1:
                    uvicorn.proc.send_signal(signal.SIGTERM)
    assert got[-1].event == "error", got[-3:]
    assert got[-1].json()["error"] == "EngineClosed"
    assert uvicorn.proc.wait(20) is not None


def mounted_outcome(adapter: str, path: str, *, root_path: str = "", env: Any = None) -> Any:
    args = [
        PYTHON, "-m", "uvicorn", f"asgi_apps:mount_{adapter}",
        "--host", "127.0.0.1", "--port", "{port}", "--no-access-log",
    ]  # fmt: skip
    if root_path:
        args += ["--root-path", root_path]
    with run_server(args, port=free_port(), env=env, ready_timeout=60) as server:
        response = httpx.get(f"{server.url}{path}", timeout=30)
        return response.status_code, response.json() if response.status_code == 200 else None


@pytest.mark.timeout(120)
def test_uvicorn_root_path_matches_asgiref_and_a2wsgi() -> None:
    """uvicorn --root-path /api, as behind a proxy that strips /api (the client's /api/hello
    arrives as /hello) and one that doesn't (it arrives as /api/hello): the same status,
    script_root and path as asgiref's WsgiToAsgi and a2wsgi."""
    for path in ("/hello", "/api/hello"):
        ours = mounted_outcome("ours", path, root_path="/api")
        assert ours == mounted_outcome("asgiref", path, root_path="/api"), path
        assert ours == mounted_outcome("a2wsgi", path, root_path="/api"), path
    assert mounted_outcome("ours", "/hello", root_path="/api") == (
        200,
        {"script_root": "/api", "path": "/hello"},
    )


@pytest.mark.timeout(120)
def test_uvicorn_script_name_environment_variable_mounts_the_app() -> None:
    """SCRIPT_NAME=/api in the server's environment (a2wsgi's convention): url_for and
    script_root see /api behind either proxy; a forwarded /api prefix is stripped from
    PATH_INFO too (gunicorn's rule), where a2wsgi keeps it and answers 404."""
    env = {"SCRIPT_NAME": "/api"}
    stripped = (200, {"script_root": "/api", "path": "/hello"})
    assert mounted_outcome("ours", "/hello", env=env) == stripped
    assert mounted_outcome("a2wsgi", "/hello", env=env) == stripped
    assert mounted_outcome("ours", "/api/hello", env=env) == stripped
    assert mounted_outcome("a2wsgi", "/api/hello", env=env)[0] == 404  # the documented difference


@pytest.mark.timeout(90)
async def test_gunicorn_sigterm_ends_a_body_over_an_engine_the_adapter_doesnt_know(
    shutdown_file: Path,
) -> None:
    """gunicorn -k uvicorn_worker.UvicornWorker: as under uvicorn, a body the drain only
    knows from ASYNC_BODY_KEY ends with event: error, and a /v1 stream with OpenAI's
    error event; the workers exit 0."""
    env = {"ASGI_TEST_SHUTDOWN_FILE": str(shutdown_file), "ASGI_TEST_DRAIN": "1"}
    with run_server(gunicorn_args(), port=free_port(), env=env, ready_timeout=60) as server:
        async with httpx.AsyncClient(timeout=30) as client:
            v1: list[Any] = []

            async def v1_stream() -> None:
                v1.extend(await read_v1_until_signal(client, server.url, server))

            got: list[ServerSentEvent] = []
            decoder = SSEDecoder()

            async def unknown_stream() -> None:
                url = f"{server.url}/unknown?prompt=g"
                async with client.stream("GET", url) as response:
                    assert response.status_code == 200
                    async for chunk in response.aiter_bytes():
                        got.extend(decoder.feed(chunk))
                        if len(got) == 1:
                            server.proc.send_signal(signal.SIGTERM)

            async with anyio.create_task_group() as tg:
                tg.start_soon(unknown_stream)
                tg.start_soon(v1_stream)
        assert got[-1].event == "error", got[-3:]
        assert got[-1].json()["error"] == "EngineClosed"
        assert "error" in v1[-1], v1[-3:]
        assert server.proc.wait(30) == 0


V1_STREAM = {
    "model": "llmbridge",
    "stream": True,
    "max_tokens": 4000,
    "messages": [{"role": "user", "content": "drain me"}],
}


async def read_v1_until_signal(client: httpx.AsyncClient, url: str, server: Server) -> list[Any]:
    """Stream a /v1 chat completion, SIGTERM the server after its first event; the
    events' JSON (``[DONE]`` as the string)."""
    events: list[Any] = []
    decoder = SSEDecoder()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=V1_STREAM) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_bytes():
            for event in decoder.feed(chunk):
                events.append("[DONE]" if event.data == "[DONE]" else event.json())
                if len(events) == 1:
                    server.proc.send_signal(signal.SIGTERM)
    return events


@pytest.mark.timeout(60)
async def test_uvicorn_sigterm_ends_a_v1_stream_with_its_final_error_event(
    uvicorn: Server,
) -> None:
    """A /v1 chat stream open at SIGTERM ends with OpenAI's error event and a clean end
    of the body (no cut connection); the server exits."""
    async with httpx.AsyncClient(timeout=30) as client:
        events = await read_v1_until_signal(client, uvicorn.url, uvicorn)
    assert "error" in events[-1], events[-3:]
    assert events[-1]["error"]["message"]
    assert uvicorn.proc.wait(20) is not None
