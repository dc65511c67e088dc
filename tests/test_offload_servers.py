"""bridge.to_process under real servers, with what real native clients do in the worker:
write to fds 1 and 2, raise exceptions that can't be rebuilt from their args, return
classes of the main script (tests/offload_app.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from support import PYTHON, ROOT, Server, free_port, run_server, wait_until

APP = "offload_app:create_app()"
SCRIPT = str(ROOT / "tests" / "offload_app.py")
PROBLEM = "application/problem+json"


def as_script() -> list[str]:
    return [PYTHON, SCRIPT, "{port}"]


def under_python_m_flask() -> list[str]:
    return [PYTHON, "-m", "flask", "--app", APP, "run", "--port", "{port}", "--no-reload"]


def under_gunicorn_preload() -> list[str]:
    return [
        PYTHON, "-m", "gunicorn", "--preload", "-k", "gthread", "--threads", "8", "-w", "2",
        "-b", "127.0.0.1:{port}", APP,
    ]  # fmt: skip


class FakeOpenAI(ThreadingHTTPServer):
    """An OpenAI-compatible chat completions endpoint on 127.0.0.1 that echoes the
    prompt."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FakeOpenAIHandler)
        self.calls = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _FakeOpenAIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeOpenAI

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][-1]["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        self.server.calls += 1
        reply = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"echo: {content}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def script_server(fake_openai: FakeOpenAI) -> Iterator[Server]:
    env = {"BAML_UPSTREAM": fake_openai.base_url}
    with run_server(as_script(), port=free_port(), env=env) as server:
        yield server


def wait_until_text(server: Server, text: str) -> bool:
    """Output from worker processes reaches the log file a moment after the reply."""
    return wait_until(lambda: text in server.log(), timeout=10)


def get(server: Server, path: str) -> httpx.Response:
    return httpx.get(server.url + path, timeout=60)


@pytest.mark.timeout(90)
def test_offloaded_code_may_write_to_fd_1_and_2(script_server: Server) -> None:
    """A worker that writes to fds 1 and 2 (os.write, libc write, print) answers 200,
    three times over, and its output reaches the server's log."""
    for _ in range(3):
        reply = get(script_server, "/noisy")
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"result": "ok"}
    assert wait_until_text(script_server, "noisy: libc write fd 1")
    log = script_server.log()
    for line in ("noisy: os.write fd 1", "noisy: os.write fd 2", "noisy: print"):
        assert line in log


@pytest.mark.timeout(90)
def test_exception_that_cant_be_rebuilt_from_args_keeps_its_type(script_server: Server) -> None:
    """ApiError(message, status_code) raised in the worker is caught as ApiError (the
    main script's own class) with its attributes, its remote traceback as __cause__."""
    reply = get(script_server, "/api-error")
    assert reply.status_code == 200, reply.text
    assert reply.json() == {
        "caught": "__main__.ApiError",
        "same_class": True,
        "status_code": 429,
        "message": "quota exhausted",
        "remote_traceback": True,
    }


@pytest.mark.timeout(90)
def test_main_script_classes_round_trip(script_server: Server) -> None:
    """A worker returns an instance of a class defined in the main script: the caller
    gets the parent's __main__ class, not "No module named '__mp_main__'"."""
    reply = get(script_server, "/verdict")
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"type": "__main__.Verdict", "same_class": True, "text": "fine"}


@pytest.mark.timeout(90)
def test_offload_failures_are_problem_json(script_server: Server) -> None:
    """An exception that can't cross back, a worker that dies and a timeout each answer
    problem+json with a fitting status, and the worker's own text (here a DSN with a
    password) never reaches the client; the next call still works."""
    reply = get(script_server, "/local-error")
    assert reply.status_code == 500
    assert reply.headers["content-type"].startswith(PROBLEM)
    assert "hunter2" not in reply.text
    assert "LocalError" not in reply.text

    reply = get(script_server, "/die")
    assert reply.status_code == 500
    assert reply.headers["content-type"].startswith(PROBLEM)

    reply = get(script_server, "/slow")
    assert reply.status_code == 504
    assert reply.headers["content-type"].startswith(PROBLEM)
    assert reply.json()["status"] == 504

    assert get(script_server, "/noisy").json() == {"result": "ok"}


@pytest.mark.timeout(90)
def test_to_thread_waits_on_the_pool_without_the_background_loop(script_server: Server) -> None:
    """A sync view's to_thread runs on the bridge's pool threads and never starts (or
    crosses) the background event loop; a timeout answers 504 problem+json."""
    reply = get(script_server, "/thread")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["loop_threads"] == []
    assert body["ran_on"]
    assert all(name.startswith("llmbridge-offload") for name in body["ran_on"])

    reply = get(script_server, "/slow-thread")
    assert reply.status_code == 504
    assert reply.headers["content-type"].startswith(PROBLEM)


@pytest.mark.skipif(importlib.util.find_spec("baml_py") is None, reason="needs baml-py")
@pytest.mark.timeout(120)
def test_real_baml_client_in_a_worker_process(
    script_server: Server, fake_openai: FakeOpenAI
) -> None:
    """The real baml-py runtime at its default log level (it logs each call to fd 1 from
    Rust) called through to_process against a 127.0.0.1 OpenAI-compatible server: every
    call answers 200 with the model's text, and BAML's log reaches the server's log."""
    before = fake_openai.calls
    for _ in range(3):
        reply = get(script_server, "/baml")
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"text": "echo: Say hello to ada"}
    assert fake_openai.calls == before + 3
    assert wait_until_text(script_server, "[BAML INFO] Function Greet")


@pytest.mark.timeout(120)
def test_python_m_flask_run_starts_workers() -> None:
    """Under `python -m flask run` (whose __main__ is a package module) worker processes
    start and answer, with the app module's classes."""
    with run_server(under_python_m_flask(), port=free_port()) as server:
        reply = get(server, "/verdict")
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"type": "offload_app.Verdict", "same_class": True, "text": "fine"}
        assert get(server, "/api-error").json()["caught"] == "offload_app.ApiError"
        assert get(server, "/noisy").json() == {"result": "ok"}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_gunicorn_preload_children_get_working_pools() -> None:
    """Under gunicorn --preload, with the master's pool started before it forks (the
    app makes one call while it is created), each worker gets a working pool of its
    own: calls answer from worker processes that are the worker's, not the master's;
    a worker that exits stops its own worker processes and leaves the master's alone."""
    env = {"OFFLOAD_APP_WARM": "1"}
    with run_server(under_gunicorn_preload(), port=free_port(), env=env) as server:
        seen: dict[int, set[int]] = {}
        for _ in range(40):
            reply = get(server, "/pid")
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["worker"] != body["server"]
            seen.setdefault(body["server"], set()).add(body["worker"])
            if len(seen) == 2:
                break
        workers = [pids for pids in seen.values()]
        # No worker process serves two gunicorn workers: the pools aren't shared.
        for i, pids in enumerate(workers):
            for other in workers[i + 1 :]:
                assert not pids & other
        for server_pid, pids in seen.items():
            for pid in pids:
                assert _parent_of(pid) == server_pid
        assert get(server, "/noisy").json() == {"result": "ok"}

        # A gunicorn worker that exits normally stops its own worker processes, never
        # the ones the master started before forking.
        warm = get(server, "/warm-pid").json()["warm"]
        assert _alive(warm)
        assert _parent_of(warm) == server.proc.pid
        leaving = next(iter(seen))
        os.kill(leaving, signal.SIGTERM)
        assert wait_until(lambda: not _alive(leaving), timeout=30)
        assert all(not _alive(pid) for pid in seen[leaving])
        assert _alive(warm)
        assert get(server, "/noisy").json() == {"result": "ok"}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1][0] not in "ZX"
    except FileNotFoundError:
        return False


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(") ", 1)[1].split()[1])
