"""The stream socket of the engine process (llmbridge._host.streams), spoken to directly:
a real ``llmbridge serve`` in a subprocess, raw Unix-socket clients in this process, so
each case sees the wire exactly as a worker (or a hostile local process) does."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import threading
import time
from typing import Any

import httpx
import pytest
from test_host import EXPECTED, EngineServer, engine_server

from llmbridge import BadRequest, LLMBridgeError, UpstreamError, UpstreamRejected
from llmbridge.gunicorn import EngineClient

from support import wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def server() -> Any:
    with engine_server() as server:
        yield server


def stream_path(server: EngineServer) -> str:
    return server.socket + ".stream"


def exchange(server: EngineServer, raw: bytes, *, shut: bool = False) -> list[Any]:
    """Send ``raw`` on a new stream connection and read lines until the engine closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(stream_path(server))
        try:
            sock.sendall(raw)
        except BrokenPipeError:
            pass  # it answered and closed before reading all of it: read the answer
        if shut:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def stats(server: EngineServer) -> dict[str, Any]:
    transport = httpx.HTTPTransport(uds=server.socket)
    with httpx.Client(transport=transport, base_url="http://engine", timeout=10) as client:
        data: dict[str, Any] = client.get("/llmbridge/v1/stats").json()
    return data


def test_a_request_line_streams_text_then_done(server: EngineServer) -> None:
    request = {"prompt": "wire", "request_id": "wire-1", "params": {"max_new_tokens": 6}}
    lines = exchange(server, json.dumps(request).encode() + b"\n")
    texts = [line[1] for line in lines if line[0] == "t"]
    assert "".join(texts) == EXPECTED.expected_text("wire", max_new_tokens=6)
    assert lines[-1][0] == "d"
    assert lines[-1][1]["id"] == "wire-1"
    assert lines[-1][1]["finish_reason"] == "length"
    assert lines[-1][1]["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b"this is not json\n", 400, "not JSON"),
        (b"[1, 2]\n", 400, "JSON object"),
        (b'{"prompt": 5}\n', 400, "prompt must be a string"),
        (b'{"prompt": "x", "request_id": "bad id!"}\n', 400, "request_id"),
        (b"\xff\xfe\n", 400, "not JSON"),
    ],
)
def test_bad_request_lines_get_one_problem_line(
    server: EngineServer, raw: bytes, status: int, needle: str
) -> None:
    lines = exchange(server, raw)
    assert len(lines) == 1, lines
    kind, body = lines[0]
    assert kind == "e"
    assert body["status"] == status
    assert needle in body["detail"]
    assert "Traceback" not in json.dumps(body)


def test_an_over_long_request_line_is_413_and_the_engine_goes_on(server: EngineServer) -> None:
    before = stats(server)["stats"]["submitted"]
    lines = exchange(server, b'{"prompt": "' + b"x" * (17 << 20) + b'"}\n')
    assert [line[0] for line in lines] == ["e"]
    assert lines[0][1]["status"] == 413
    assert stats(server)["stats"]["submitted"] == before
    client = EngineClient(server.socket)
    try:
        with pytest.raises(BadRequest) as refused:  # our own client doesn't even send it
            client.submit("x" * (17 << 20)).result(20)
        assert refused.value.status == 413
        text = client.submit("after", max_new_tokens=3).result(20).text
        assert text == EXPECTED.expected_text("after", max_new_tokens=3)
    finally:
        client.close(5)


def test_a_client_that_leaves_before_its_line_ends_submits_nothing(server: EngineServer) -> None:
    before = stats(server)["stats"]["submitted"]
    assert exchange(server, b'{"prompt": "half', shut=True) == []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(stream_path(server))  # connects, says nothing, goes
    deadline = time.monotonic() + 10
    while stats(server)["stream_connections"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats(server)["stream_connections"] == 0
    assert stats(server)["stats"]["submitted"] == before


def test_closing_mid_stream_cancels_in_the_engine_and_leaves_no_connection(
    server: EngineServer,
) -> None:
    before = stats(server)["stats"]
    request = {"prompt": "long", "params": {"max_new_tokens": 5000}}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(stream_path(server))
        sock.sendall(json.dumps(request).encode() + b"\n")
        assert sock.recv(65536).startswith(b'["t",')
        assert stats(server)["stream_connections"] == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = stats(server)
        if now["stats"]["cancelled"] > before["cancelled"] and now["stream_connections"] == 0:
            break
        time.sleep(0.05)
    assert now["stats"]["cancelled"] == before["cancelled"] + 1
    assert now["stream_connections"] == 0
    assert now["in_flight"] == 0


def test_many_clients_at_once_each_get_their_own_text(server: EngineServer) -> None:
    client = EngineClient(server.socket)
    texts: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            texts[i] = "".join(client.submit(f"many {i}", max_new_tokens=8))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        client.close(10)
    assert not errors
    assert texts == {i: EXPECTED.expected_text(f"many {i}", max_new_tokens=8) for i in range(64)}
    assert stats(server)["stream_connections"] == 0


def test_the_stream_socket_is_0600_and_goes_with_the_engine() -> None:
    with engine_server() as server:
        path = stream_path(server)
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
        assert not os.path.exists(path)
        assert not os.path.exists(server.socket)


def every_error() -> list[type[LLMBridgeError]]:
    from llmbridge._host.wire import _CLASSES

    return sorted(_CLASSES.values(), key=lambda cls: cls.__name__)


@pytest.mark.parametrize("cls", every_error(), ids=lambda cls: cls.__name__)
def test_every_error_class_crosses_with_its_status_and_public_detail(
    cls: type[LLMBridgeError],
) -> None:
    """What a worker rebuilds from the engine process's problem line: the same class,
    the status the engine process chose, its client-safe detail (never backend text)."""
    from llmbridge._host.wire import error_from_problem
    from llmbridge._sansio.problem import problem

    try:
        error = cls("the backend's secret text")
    except TypeError:
        pytest.skip(f"{cls.__name__} is not built from a message")
    error.status = 429 if cls.status == 429 else 418 if cls.status < 500 else 507
    body = json.loads(json.dumps(problem(error, "rid-1")))
    again = error_from_problem(body)
    assert type(again) is cls or (issubclass(cls, UpstreamError) and type(again) is UpstreamError)
    assert again.status == error.status
    assert again.public_message == body["detail"]
    assert ("secret" in again.public_message) == error.public


def test_an_upstream_rejection_crosses_with_its_error_object() -> None:
    from llmbridge._host.wire import error_from_problem
    from llmbridge._sansio.problem import problem

    fields = {"message": "bad schema", "type": "invalid_request_error", "param": "tools"}
    error = UpstreamRejected("bad schema", upstream_status=422, error_object=fields)
    again = error_from_problem(json.loads(json.dumps(problem(error, "rid-2"))))
    assert isinstance(again, UpstreamRejected)
    assert again.status == 422
    assert again.error_object == {**fields, "code": None}


def test_a_workers_metrics_observer_never_calls_the_engine_process(
    server: EngineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``llmbridge:`` observer of a worker's EngineClient reads the worker's own
    load on every admission and end: never a blocking call to the engine process (its
    ``queued`` / ``in_flight``), which would stall the client's loop per request."""
    from prometheus_client import REGISTRY

    from llmbridge.metrics import instrument

    client = EngineClient(server.socket, name="observed-client")
    calls: list[str] = []

    def remote() -> dict[str, Any]:
        calls.append("remote")
        raise AssertionError("a blocking call to the engine process on the request path")

    monkeypatch.setattr(client, "remote", remote)
    try:
        instrument(client)
        streams = [client.submit(f"obs {i}", max_new_tokens=4) for i in range(16)]
        texts = [stream.result(20).text for stream in streams]
        assert texts == [EXPECTED.expected_text(f"obs {i}", max_new_tokens=4) for i in range(16)]
        assert wait_until(lambda: client.local_load() == (0, 0))
        labels = {"engine": "observed-client"}
        assert REGISTRY.get_sample_value("llmbridge:num_requests_running", labels) == 0
        assert REGISTRY.get_sample_value("llmbridge:num_requests_waiting", labels) == 0
    finally:
        client.close(5)
    assert calls == []
