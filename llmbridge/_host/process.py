"""Running the engine process: load the submitter, serve it, and keep it running.

:func:`serve_once` is the engine process itself (the model is loaded here, and only
here); :func:`supervise` runs it as a child and starts a new one when it dies, so a crash
costs the requests in flight (503 at once) and nothing after; :class:`EngineProcess`
starts and stops the supervisor from a gunicorn arbiter's hooks.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from .._core.engine import Submitter
from .wire import HEALTH_PATH, SOCKET_ENV

__all__ = [
    "USAGE_ERROR",
    "EngineProcess",
    "default_socket_path",
    "exit_with_parent",
    "load_submitter",
    "serve_once",
    "supervise",
    "wait_ready",
]

logger = logging.getLogger("llmbridge.host")

#: The exit status of an engine process that cannot start (``llmbridge serve``'s one-line
#: errors): its supervisor gives up instead of restarting it.
USAGE_ERROR = 2


def default_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/llmbridge-engine.sock``, else a 0700 directory of this user's
    under the temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "llmbridge-engine.sock")
    folder = os.path.join(tempfile.gettempdir(), f"llmbridge-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return os.path.join(folder, "engine.sock")


def load_submitter(target: str) -> Submitter:
    """``"module:attr"`` as a submitter: the attribute itself when it has ``submit``
    (an engine, a pipeline), else what calling it returns (a factory). Imports the module
    (and so loads the model): call it only in the engine process. Raises ``ValueError``
    for a target that names nothing usable."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected module:attribute, got {target!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not hasattr(obj, "submit") and callable(obj):
        obj = obj()
    if not hasattr(obj, "submit"):
        raise ValueError(f"{target} is neither a submitter nor a factory returning one")
    submitter: Submitter = obj
    return submitter


def exit_with_parent(interval: float = 0.5) -> None:
    """Send this process SIGTERM once its parent is gone (it was killed without a chance
    to stop us), from a daemon thread: no engine process outlives its supervisor."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="llmbridge-parent-watch", daemon=True).start()


def serve_once(
    target: str,
    socket_path: str,
    *,
    group: str | None = None,
    graceful_timeout: float = 10.0,
    keep_alive: float = 60.0,
    log_level: str = "warning",
) -> int:
    """Be the engine process: load ``target``, serve it on ``socket_path`` until SIGTERM
    or SIGINT, then close it. Blocks; returns the exit status.

    The socket is bound only once the submitter is built and started, so a client that
    connects finds a loaded model. uvicorn stops on the signal, letting responses run up to
    ``graceful_timeout`` seconds (the workers drained theirs before the arbiter stops us).
    A connection idle for ``keep_alive`` seconds (a worker's pooled one) is closed.
    """
    import uvicorn

    from .server import EngineApp, bind_unix_socket
    from .streams import MAX_LINE, StreamServer, stream_socket_path

    os.environ.pop(SOCKET_ENV, None)  # this process is the engine: build it, don't connect
    submitter = load_submitter(target)
    start = getattr(submitter, "start", None)
    if callable(start):
        start()
    streams = StreamServer(submitter)
    stream_path = stream_socket_path(socket_path)
    stream_sock = bind_unix_socket(stream_path, group=group)
    sock = bind_unix_socket(socket_path, group=group)  # last: clients wait for this one
    inodes = {path: os.stat(path).st_ino for path in (socket_path, stream_path)}
    app = EngineApp(submitter, streams=streams)
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=int(graceful_timeout) or None,
        timeout_keep_alive=max(1, round(keep_alive)),
    )
    server = uvicorn.Server(config)
    app.connections = lambda: len(server.server_state.connections)
    logger.info("engine process %d serves %s on %s", os.getpid(), target, socket_path)
    # uvicorn re-raises the signal that stopped it once it has restored the handlers it
    # found: with the default ones the process would die there, before the engine
    # closes and the socket is removed. Found handlers that ignore it let us finish.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopped)

    async def serve() -> None:
        stream_server = await asyncio.start_unix_server(streams, sock=stream_sock, limit=MAX_LINE)
        try:
            await server.serve(sockets=[sock])
        finally:
            stream_server.close()
            await streams.wait_closed(graceful_timeout)

    # uvicorn's own choice of loop (uvloop when installed), as ``server.run`` makes it.
    factory = getattr(config, "get_loop_factory", None)
    if factory is None:  # uvicorn before 0.36 sets a loop policy instead
        config.setup_event_loop()
    try:
        with asyncio.Runner(loop_factory=factory() if factory is not None else None) as runner:
            runner.run(serve())
    finally:
        close = getattr(submitter, "close", None)
        if callable(close):
            close()
        sock.close()
        stream_sock.close()
        for path, inode in inodes.items():
            try:
                if os.stat(path).st_ino == inode:  # still ours, not a successor's
                    os.unlink(path)
            except OSError:
                pass
    return 0


def _stopped(signum: int, frame: Any) -> None:
    """The engine process's handler once uvicorn has stopped: nothing more to do."""


def supervise(child: Sequence[str], *, restart_delay: float = 0.5, max_delay: float = 10.0) -> int:
    """Run ``child`` (an engine process's command line) and start it again whenever it
    exits unasked, waiting ``restart_delay`` (doubling while it keeps dying within a
    second, up to ``max_delay``). SIGTERM / SIGINT stop the child and end with 0. A child
    that exits with :data:`USAGE_ERROR` (it cannot start: a bad target, a socket in use)
    is not restarted: this returns 2. Blocks.
    """
    # A plain flag, not a threading.Event: the handler runs on the main thread, maybe
    # inside Event.set's own lock, and an Event would deadlock on it.
    stopping = [False]
    current: list[subprocess.Popen[bytes]] = []

    def stopped() -> bool:
        return stopping[0]

    def stop(signum: int, frame: Any) -> None:
        stopping[0] = True
        for proc in current:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    delay = restart_delay
    while not stopped():
        started = time.monotonic()
        proc = subprocess.Popen(list(child))
        current[:] = [proc]
        if stopped():  # a signal between the check and the Popen
            proc.send_signal(signal.SIGTERM)
        code = proc.wait()
        if stopped():
            break
        if code == USAGE_ERROR:
            # A target that names nothing, a socket another engine serves: it said why
            # in one line, and starting it again would fail again, forever.
            return code
        logger.error("the engine process exited with %s; starting a new one", code)
        print(f"llmbridge serve: engine process exited ({code}); restarting", file=sys.stderr)
        delay = min(delay * 2, max_delay) if time.monotonic() - started < 1.0 else restart_delay
        wake = time.monotonic() + delay
        while not stopped() and time.monotonic() < wake:
            time.sleep(0.05)
    return 0


def wait_ready(
    socket_path: str, *, timeout: float = 120.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until the engine process at ``socket_path`` answers its health check.
    Raises ``TimeoutError`` after ``timeout`` seconds, ``RuntimeError`` if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    request = f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the engine process exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(socket_path)
                sock.sendall(request)
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no engine process answered on {socket_path} within {timeout} s")


class EngineProcess:
    """The host's engine process, started and stopped by a gunicorn arbiter's hooks.

    Building it (in ``gunicorn.conf.py``) sets :data:`SOCKET_ENV` in the arbiter, before
    any app is loaded or worker forked, so every worker's
    :func:`~llmbridge.gunicorn.shared_engine` connects instead of loading a model.
    :meth:`on_starting` starts ``python -m llmbridge serve TARGET`` (a supervisor that
    restarts a crashed engine) and blocks until it answers; :meth:`on_exit`, which
    gunicorn calls after its workers have drained, stops it; :meth:`post_fork` makes a
    worker whose arbiter died stop too. The model is loaded in the
    engine process only: never in the arbiter, never before a fork.
    """

    def __init__(
        self,
        target: str,
        *,
        socket_path: str | None = None,
        group: str | None = None,
        ready_timeout: float = 300.0,
        stop_timeout: float = 30.0,
        graceful_timeout: float = 10.0,
        python: str = sys.executable,
    ) -> None:
        self.target = target
        self.socket_path = socket_path or os.environ.get(SOCKET_ENV) or default_socket_path()
        self.group = group
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.graceful_timeout = graceful_timeout
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        os.environ[SOCKET_ENV] = self.socket_path

    def __repr__(self) -> str:
        return f"EngineProcess({self.target!r}, socket_path={self.socket_path!r})"

    def command(self) -> list[str]:
        """The supervisor's command line."""
        argv = [self.python, "-m", "llmbridge", "serve", self.target]
        argv += ["--socket", self.socket_path, "--exit-with-parent"]
        argv += ["--graceful-timeout", str(self.graceful_timeout)]
        if self.group is not None:
            argv += ["--group", self.group]
        return argv

    def start(self) -> None:
        """Start the supervised engine process and wait until it serves. Blocks up to
        ``ready_timeout``; raises ``TimeoutError`` / ``RuntimeError`` if it doesn't."""
        if self.proc is not None and self.proc.poll() is None:
            return
        # Its own session: a terminal's Ctrl-C reaches the arbiter, which stops the
        # workers first (they drain their streams) and then us, in that order.
        self.proc = subprocess.Popen(self.command(), start_new_session=True)
        try:
            wait_ready(self.socket_path, timeout=self.ready_timeout, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int | None:
        """SIGTERM the supervisor, wait up to ``stop_timeout``, then kill. Blocks;
        returns its exit status (``None`` if it never ran)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def on_starting(self, server: Any) -> None:
        """gunicorn's ``on_starting`` hook: :meth:`start`."""
        self.start()

    def on_exit(self, server: Any) -> None:
        """gunicorn's ``on_exit`` hook: :meth:`stop`."""
        self.stop()

    def post_fork(self, server: Any, worker: Any) -> None:
        """gunicorn's ``post_fork`` hook: the worker stops (SIGTERM, so it drains) once
        its arbiter is gone. gthread and sync workers notice that themselves; uvicorn's
        worker does not, and would serve on, answering 503 without its engine process,
        after an arbiter killed with SIGKILL (no ``on_exit`` ran). Never blocks."""
        exit_with_parent()
