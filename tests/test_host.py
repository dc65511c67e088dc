"""The shared engine process and its client (llmbridge._host, llmbridge.gunicorn):
``llmbridge serve`` in a real subprocess on a Unix socket, clients in this process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmbridge import BackendError, BadRequest, Cancelled, EngineClosed, Overloaded
from llmbridge.gunicorn import EngineClient, shared_engine
from llmbridge.testing import SimulatedGenerator

from support import PYTHON, ROOT, JsonlRecord

pytestmark = pytest.mark.timeout(90)

EXPECTED = SimulatedGenerator(max_new_tokens=16)
SERVE = [PYTHON, "-m", "llmbridge", "serve", "host_apps:engine", "--socket"]


class EngineServer(JsonlRecord):
    """``python -m llmbridge serve host_apps:engine`` on a socket in a temp dir."""

    wait_timeout = 20.0

    def __init__(self, folder: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.folder = folder
        self.socket = str(folder / "engine.sock")
        self.record = folder / "record.jsonl"
        self.proc = proc
        self.log = log


def host_env(folder: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LLMBRIDGE_ENGINE_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env["HOST_APPS_RECORD"] = str(folder / "record.jsonl")
    env.update(extra)
    return env


@contextlib.contextmanager
def engine_server(*args: str, **env: str) -> Iterator[EngineServer]:
    from llmbridge._host.process import wait_ready

    with tempfile.TemporaryDirectory(prefix="llmbridge-host-") as tmp:
        folder = Path(tmp)
        log = folder / "serve.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*SERVE, str(folder / "engine.sock"), *args],
                env=host_env(folder, **env),
                cwd=str(ROOT),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = EngineServer(folder, proc, log)
        try:
            wait_ready(server.socket, timeout=30, proc=proc)
            yield server
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


@pytest.fixture(scope="module")
def server() -> Iterator[EngineServer]:
    with engine_server() as server:
        yield server


@pytest.fixture
def client(server: EngineServer) -> Iterator[EngineClient]:
    client = EngineClient(server.socket)
    yield client
    client.close(5)


def test_result_and_sync_stream_are_the_engine_process_text(client: EngineClient) -> None:
    """A stream read in a thread, and result(), carry exactly the engine's text."""
    assert client.submit("alpha", max_new_tokens=8).result(10).text == EXPECTED.expected_text(
        "alpha", 8
    )
    chunks = list(client.submit("beta", max_new_tokens=6))
    assert "".join(chunks) == EXPECTED.expected_text("beta", 6)
    assert len(chunks) >= 2  # streamed, not one answer at the end


def test_async_reading_and_usage(client: EngineClient) -> None:
    """async for / aresult on any loop; the usage is the engine process's."""

    async def main() -> tuple[str, Any]:
        text = "".join([c async for c in client.submit("gamma", max_new_tokens=5)])
        stream = client.submit("delta", max_new_tokens=4)
        await stream.await_started(10)
        return text, await stream.aresult(10)

    text, completion = asyncio.run(main())
    assert text == EXPECTED.expected_text("gamma", 5)
    assert completion.completion_tokens == 4
    assert completion.finish_reason == "length" or completion.finish_reason == "stop"


def test_request_id_is_the_engine_process_id(server: EngineServer, client: EngineClient) -> None:
    """The id the worker chose names the job in the engine process too."""
    stream = client.submit("ids", max_new_tokens=3, request_id="trace-42")
    stream.result(10)
    assert stream.id == "trace-42"
    assert any("trace-42" in line.get("ids", ()) for line in server.lines())
    own = client.submit("ids", max_new_tokens=2)
    own.result(10)
    assert own.id.startswith(f"w{os.getpid()}-")


def test_cancel_reaches_the_engine_process_within_one_step(
    server: EngineServer, client: EngineClient
) -> None:
    """Closing the stream cancels the job in the engine process before its next step."""
    stream = client.submit("long", max_new_tokens=10_000, request_id="cancel-me")
    reader = iter(stream)
    for _ in range(3):
        next(reader)
    running = [line["step"] for line in server.lines() if "cancel-me" in line.get("ids", ())]
    reader.close()  # type: ignore[attr-defined]
    with pytest.raises(Cancelled):
        stream.result(1)
    lines = server.wait_for(lambda ls: any(x.get("cancelled") == "cancel-me" for x in ls))
    cancelled = next(x for x in lines if x.get("cancelled") == "cancel-me")
    # The step in progress at close() may finish; no further step holds the job.
    assert cancelled["step"] <= max(running) + 1
    later = [x for x in lines if "cancel-me" in x.get("ids", ()) and x["step"] > cancelled["step"]]
    assert later == []


def test_errors_arrive_as_the_same_class_without_backend_text(client: EngineClient) -> None:
    """A backend error is a BackendError here, with no backend text; a bad request a
    BadRequest."""
    with pytest.raises(BackendError) as caught:
        client.submit("bad", max_new_tokens="many").result(10)
    assert "positive int" not in str(caught.value)  # the ValueError's text stays there
    assert "request id" in caught.value.public_message
    with pytest.raises(BackendError):
        client.submit("fails", max_new_tokens=8, error_after=2).result(10)
    with pytest.raises(BadRequest):
        client.submit("unjsonable", max_new_tokens=2, blob=object()).result(10)


def test_admission_and_stats_are_host_wide() -> None:
    """max_queued holds across clients (Overloaded arrives as Overloaded, with
    Retry-After), and every client's stats are the engine process's."""
    with engine_server(HOST_APPS_MAX_QUEUED="2", HOST_APPS_STEP="0.05") as server:
        a, b = EngineClient(server.socket), EngineClient(server.socket)
        try:
            # max_batch_size is 256, so queued requests leave the queue at once: hold
            # them with a slow engine and count what is admitted while it steps.
            streams = [c.submit(f"p{i}", max_new_tokens=400) for i, c in enumerate([a, b] * 4)]
            errors: list[BaseException] = []
            for stream in streams:
                try:
                    stream.wait_started(10)
                except Overloaded as exc:
                    errors.append(exc)
            stats = a.stats
            assert stats.as_dict() == b.stats.as_dict() or stats.submitted == b.stats.submitted
            assert stats.submitted >= 2
            assert a.in_flight == b.in_flight
            for stream in streams:
                stream.close()
            server.wait_for(lambda ls: True)
            deadline = time.monotonic() + 10
            while a.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            assert a.in_flight == 0
            assert a.queued == 0
            final = a.stats
            assert final.submitted == final.completed + final.failed + final.cancelled
            assert a.local_stats.submitted == 4
        finally:
            a.close(5)
            b.close(5)


def test_overloaded_crosses_as_overloaded() -> None:
    """A full engine queue refuses with Overloaded (503, Retry-After) in the worker."""
    with engine_server(HOST_APPS_MAX_QUEUED="1") as server:
        from llmbridge._host.wire import error_from_problem
        from llmbridge._sansio.problem import problem

        error = error_from_problem(json.dumps(problem(Overloaded("full", retry_after=3.0))))
        assert type(error) is Overloaded
        assert error.retry_after == 3.0
        assert error.status == 503
        client = EngineClient(server.socket)
        try:
            assert client.submit("x", max_new_tokens=2).result(10).text
        finally:
            client.close(5)


def test_engine_process_crash_fails_in_flight_at_once_and_is_restarted() -> None:
    """A crash ends every in-flight stream with a 503 (EngineClosed) at once; the
    supervisor starts a new engine process and the next request is served."""
    with engine_server() as server:
        client = EngineClient(server.socket)
        try:
            first = server.lines()
            bystander = client.submit("bystander", max_new_tokens=10_000)
            bystander.wait_started(10)
            crasher = client.submit("boom", max_new_tokens=50, crash=1)
            for stream in (bystander, crasher):
                with pytest.raises(EngineClosed) as caught:
                    stream.result(10)
                assert caught.value.status == 503
                assert caught.value.retry_after == 1.0
            lines = server.wait_for(
                lambda ls: len([x for x in ls if "loaded" in x]) >= 2, timeout=30
            )
            assert len([x for x in first if "loaded" in x]) == 1
            from llmbridge._host.process import wait_ready

            wait_ready(server.socket, timeout=30)
            assert client.submit("after", max_new_tokens=4).result(10).text == (
                EXPECTED.expected_text("after", 4)
            )
            assert len({x["loaded"] for x in lines if "loaded" in x}) == 2
        finally:
            client.close(5)


def test_sigterm_stops_the_engine_process_with_status_0() -> None:
    """SIGTERM to `llmbridge serve` stops its engine process and removes the socket."""
    with engine_server() as server:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
        assert not os.path.exists(server.socket)


def test_no_socket_means_a_local_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """shared_engine() builds the engine here when no socket is configured, and never
    calls the factory when one is."""
    from llmbridge import Engine

    monkeypatch.delenv("LLMBRIDGE_ENGINE_SOCKET", raising=False)
    local = shared_engine(lambda: Engine(lambda prompt: prompt.upper()))
    assert isinstance(local, Engine)
    assert not isinstance(local, EngineClient)
    assert local.submit("hi").result(5).text == "HI"
    local.close()
    monkeypatch.setenv("LLMBRIDGE_ENGINE_SOCKET", "/nonexistent/engine.sock")

    def never() -> Engine:
        raise AssertionError("the factory ran in a worker")

    remote = shared_engine(never)
    assert isinstance(remote, EngineClient)
    with pytest.raises(EngineClosed):
        remote.submit("x").result(10)  # nobody serves: 503 at once, no hang
    remote.close(5)


def test_socket_is_0600_and_refuses_other_users(server: EngineServer) -> None:
    """The socket is created mode 0600; a process of another uid can't connect."""
    mode = stat.S_IMODE(os.stat(server.socket).st_mode)
    assert mode == 0o600
    if os.getuid() != 0:
        pytest.skip("connecting as another user needs root (to setuid to nobody)")
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(server.socket)
                    code = 2  # connected: the socket let another user in
                except PermissionError:
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    # The same connect as the owner works (the refusal is about the user).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(server.socket)


def test_group_socket_is_0660(tmp_path: Path) -> None:
    """--group makes the socket 0660, owned by that group."""
    import grp

    from llmbridge._host.server import bind_unix_socket

    group = grp.getgrgid(os.getgid()).gr_name
    sock = bind_unix_socket(str(tmp_path / "g.sock"), group=group)
    try:
        info = os.stat(tmp_path / "g.sock")
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == os.getgid()
    finally:
        sock.close()


def test_a_served_socket_is_not_taken_over(server: EngineServer) -> None:
    """A second engine process on a live socket fails; a stale socket file is replaced."""
    from llmbridge._host.server import bind_unix_socket

    with pytest.raises(OSError, match="another engine process"):
        bind_unix_socket(server.socket)
    stale = server.folder / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()
    bind_unix_socket(str(stale)).close()


def test_many_threads_and_loops_share_one_client(client: EngineClient) -> None:
    """32 threads at once each get exactly their own text."""
    results: dict[int, str] = {}
    barrier = threading.Barrier(32)

    def run(i: int) -> None:
        barrier.wait(10)
        results[i] = client.submit(f"t{i}", max_new_tokens=6).result(20).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: EXPECTED.expected_text(f"t{i}", 6) for i in range(32)}


def test_openai_surface_on_the_socket(server: EngineServer) -> None:
    """/v1 on the engine's socket answers like the blueprints: a streamed completion
    ending in [DONE], the models list, OpenAI-shaped errors."""
    import httpx

    transport = httpx.HTTPTransport(uds=server.socket)
    with httpx.Client(transport=transport, base_url="http://engine", timeout=20) as client:
        body = {"model": "llmbridge", "prompt": "open", "max_tokens": 5, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        text = "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])
        assert text == EXPECTED.expected_text("open", 5)
        whole = client.post("/v1/completions", json={**body, "stream": False})
        assert whole.json()["choices"][0]["text"] == EXPECTED.expected_text("open", 5)
        assert client.get("/v1/models").status_code == 200
        bad = client.post("/v1/completions", json={"prompt": 3})
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
        missing = client.get("/nowhere")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"


def test_serve_with_a_bad_target_is_one_line_and_status_2(tmp_path: Path) -> None:
    """`llmbridge serve nowhere:engine --no-restart` fails with a clear line, exit 2."""
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "llmbridge",
            "serve",
            "host_apps:nothing",
            "--no-restart",
            "--socket",
            str(tmp_path / "e.sock"),
        ],
        env=host_env(tmp_path),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("llmbridge serve:")
    assert "Traceback" not in result.stderr


def test_a_supervised_engine_that_cannot_start_is_not_restarted(tmp_path: Path) -> None:
    """`llmbridge serve nowhere:engine` (supervised) gives up on a target that names
    nothing (one line, exit 2) instead of restarting it forever, so gunicorn's
    on_starting (EngineProcess.start) fails at once instead of waiting for it."""
    from llmbridge.gunicorn import EngineProcess

    result = subprocess.run(
        [*SERVE[:-2], "host_apps:nothing", "--socket", str(tmp_path / "e.sock")],
        env=host_env(tmp_path),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("llmbridge serve:")
    with pytest.MonkeyPatch.context() as patch:
        # EngineProcess sets the socket variable in this process: restored after.
        patch.setenv("LLMBRIDGE_ENGINE_SOCKET", str(tmp_path / "e.sock"))
        patch.setenv("PYTHONPATH", host_env(tmp_path)["PYTHONPATH"])
        patch.chdir(ROOT)
        process = EngineProcess("host_apps:nothing")
        with pytest.raises(RuntimeError, match="exited with 2"):
            process.start()
    assert process.proc is None


def test_metrics_of_any_worker_are_the_host_figures(server: EngineServer) -> None:
    """LLMBridgeCollector over one worker's client counts what every worker submitted."""
    from prometheus_client import CollectorRegistry, generate_latest

    from llmbridge.metrics import LLMBridgeCollector

    a, b = EngineClient(server.socket), EngineClient(server.socket)
    try:
        before = a.stats.submitted
        for i in range(3):
            b.submit(f"m{i}", max_new_tokens=2).result(10)
        registry = CollectorRegistry()
        registry.register(LLMBridgeCollector(a, name="host"))
        text = generate_latest(registry).decode()
        line = next(
            x for x in text.splitlines() if x.startswith("llmbridge_requests_submitted_total")
        )
        assert float(line.split()[-1]) == before + 3  # a submitted none of them
        assert a.local_stats.submitted == 0
    finally:
        a.close(5)
        b.close(5)


def test_stats_count_what_is_open_and_the_drained_check_sees_it() -> None:
    """/llmbridge/v1/stats counts the requests and connections open on the socket (its
    own left out), and host_checks.assert_drained, which every end-to-end test ends
    with, fails while a stream or a bare connection is left open and passes once it
    is closed."""
    from host_checks import assert_drained, engine_stats, unix_connections

    from llmbridge._host.streams import stream_socket_path

    with engine_server(LLMBRIDGE_ENGINE_KEEP_ALIVE="1") as server:
        (pid,) = [x["loaded"] for x in server.lines() if "loaded" in x]
        assert_drained(server.socket, pid)
        transport = httpx.HTTPTransport(uds=server.socket)
        with httpx.Client(transport=transport, base_url="http://engine", timeout=10) as raw:
            body = {"prompt": "held", "request_id": "held-1", "params": {"max_new_tokens": 10_000}}
            with raw.stream("POST", "/llmbridge/v1/submit", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # held: dropping it would close the response
                next(lines)
                stats = engine_stats(server.socket)
                assert (stats["in_flight"], stats["requests"]) == (1, 1)
                assert stats["connections"] >= 1  # an earlier stats call's may still close
                assert unix_connections(pid, server.socket) >= 1
                with pytest.raises(AssertionError, match="'in_flight': 1, 'requests': 1"):
                    assert_drained(server.socket, pid, timeout=0.5)
        assert_drained(server.socket, pid)  # closed: the job was cancelled, all is shut
        # A pooled connection left idle (its client still open) is the engine's to close,
        # after --keep-alive (LLMBRIDGE_ENGINE_KEEP_ALIVE) seconds.
        with httpx.Client(transport=httpx.HTTPTransport(uds=server.socket)) as pooled:
            assert pooled.get("http://engine/llmbridge/v1/health").status_code == 200
            assert unix_connections(pid, server.socket) == 1
            assert_drained(server.socket, pid, timeout=10)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bare:
            bare.connect(server.socket)
            with pytest.raises(
                AssertionError, match=r"'connections': [1-9], 'stream_connections': 0"
            ):
                assert_drained(server.socket, pid, timeout=0.5)
        assert_drained(server.socket, pid)
        # The stream socket, where workers submit: a held stream there is counted too.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
            held.settimeout(10)
            held.connect(stream_socket_path(server.socket))
            request = {
                "prompt": "held",
                "request_id": "held-2",
                "params": {"max_new_tokens": 10_000},
            }
            held.sendall(json.dumps(request).encode() + b"\n")
            assert held.recv(4096).startswith(b'["t"')
            stats = engine_stats(server.socket)
            assert (stats["in_flight"], stats["stream_connections"]) == (1, 1)
            # At least this one accepted socket (the stats call's own may not be closed
            # on the engine's side yet).
            with pytest.raises(
                AssertionError, match=r"'stream_connections': 1, 'accepted_sockets': [1-9]"
            ):
                assert_drained(server.socket, pid, timeout=0.5)
        assert_drained(server.socket, pid)


def test_the_openai_sdk_reaches_the_socket(server: EngineServer) -> None:
    """The official ``openai`` SDK, given an httpx client on the engine's socket (as
    docs/howto/shared_engine.md says), streams and completes, and sees a bad request as
    its own ``BadRequestError``."""
    import httpx
    import openai

    http = httpx.Client(transport=httpx.HTTPTransport(uds=server.socket), timeout=20)
    sdk = openai.OpenAI(base_url="http://engine/v1", api_key="unused", http_client=http)
    try:
        chunks = sdk.completions.create(model="llmbridge", prompt="sdk", max_tokens=5, stream=True)
        text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
        assert text == EXPECTED.expected_text("sdk", 5)
        whole = sdk.completions.create(model="llmbridge", prompt="sdk", max_tokens=5)
        assert whole.choices[0].text == EXPECTED.expected_text("sdk", 5)
        assert [m.id for m in sdk.models.list()]
        with pytest.raises(openai.BadRequestError):
            sdk.completions.create(model="llmbridge", prompt="sdk", max_tokens=-1)
    finally:
        http.close()
