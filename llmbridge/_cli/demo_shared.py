"""``llmbridge demo --shared-engine``: the example Flask app on N gunicorn workers that
share one engine process, as ``docs/howto/shared_engine.md`` deploys a real model.

This process is the conductor, not a server: it starts the engine process (the demo's
simulated engine, under ``llmbridge serve``'s supervisor, on a socket in a private
temporary directory), then ``gunicorn -k gthread -w N`` on the port it bound, each worker
submitting to that engine through :func:`llmbridge.gunicorn.shared_engine`. Every answer
carries ``X-Worker-Pid``; ``/stats`` on any worker reports the engine process's
counters, the host's.

Both children run in sessions of their own, so a terminal's Ctrl-C reaches this process
only: the first one asks gunicorn to stop gracefully (open streams finish), then the
engine process is stopped and its directory removed; a second one stops gunicorn at
once and exits 130.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from .console import Interrupts, listen, preview, say
from .main import CommandError, checkout

__all__ = ["WORKER_PID_HEADER", "make_engine", "run_shared", "when_ready", "worker_app"]

#: The response header naming the worker process that served a request.
WORKER_PID_HEADER = "X-Worker-Pid"

_STEP_ENV = "LLMBRIDGE_DEMO_STEP_TIME"
_RETRIEVAL_ENV = "LLMBRIDGE_DEMO_RETRIEVAL_URL"
_ENGINE = "llmbridge._cli.demo_shared:make_engine"
_APP = "llmbridge._cli.demo_shared:worker_app()"


def make_engine() -> Any:
    """The engine process's engine: the demo's simulated one (``llmbridge serve`` target).
    Its step time comes from the conductor; its length from the example app's own
    ``FLASK_EXAMPLE_MAX_NEW_TOKENS`` (default 48), as in a one-process demo."""
    from ..testing import simulated_engine

    return simulated_engine(
        step_time=float(os.environ.get(_STEP_ENV, "0.05")),
        max_new_tokens=int(os.environ.get("FLASK_EXAMPLE_MAX_NEW_TOKENS", "48")),
    )


def worker_app() -> Any:
    """One gunicorn worker's app (a factory, called after the fork): the example app
    over the host's shared engine, naming this worker in every response."""
    root = checkout("examples/flask_app", what="the demo serves examples/flask_app")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from examples.flask_app import create_app

    from ..gunicorn import shared_engine

    config: dict[str, Any] = {"EXAMPLE_STEP_TIME": float(os.environ.get(_STEP_ENV, "0.05"))}
    if "FLASK_EXAMPLE_RETRIEVAL_URL" not in os.environ:  # as the one-process demo does
        config["EXAMPLE_RETRIEVAL_URL"] = os.environ.get(_RETRIEVAL_ENV)
    app = create_app(config, engine=shared_engine(make_engine))
    pid = str(os.getpid())

    @app.after_request
    def name_the_worker(response: Any) -> Any:
        response.headers[WORKER_PID_HEADER] = pid
        return response

    return app


def when_ready(server: Any) -> None:
    """gunicorn's ``when_ready`` hook in the demo's arbiter (its config is this module):
    the arbiter stops, draining its workers, once the demo that started it is gone,
    even killed with SIGKILL. Never blocks."""
    from .._host.process import exit_with_parent

    exit_with_parent()


def _engine_pid(socket_path: str) -> int:
    import httpx

    from .._host.wire import HEALTH_PATH

    transport = httpx.HTTPTransport(uds=socket_path)
    with httpx.Client(transport=transport, base_url="http://engine", timeout=5) as client:
        return int(client.get(HEALTH_PATH).json()["pid"])


def _wait_served(base: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Block until a worker answers ``/healthz``; CommandError if gunicorn exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CommandError(f"gunicorn exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise CommandError(f"no gunicorn worker answered on {base} within {timeout:g} s")


def run_shared(args: argparse.Namespace, step: float) -> int:
    """Serve the example app on ``args.workers`` workers sharing one engine process until
    Ctrl-C / SIGTERM; blocks. Returns 0 after a graceful stop, 130 after a second one."""
    workers = 2 if args.workers is None else args.workers
    if workers < 1:
        raise CommandError("--workers must be at least 1")
    if importlib.util.find_spec("gunicorn") is None:
        raise CommandError('--shared-engine runs gunicorn workers: pip install -e ".[asgi]"')
    root = checkout("examples/flask_app", what="the demo serves examples/flask_app")
    from .._host.process import EngineProcess

    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{port}"
    local = "127.0.0.1" if args.host in ("", "0.0.0.0", "::") else host
    folder = tempfile.mkdtemp(prefix="llmbridge-demo-")
    os.environ[_STEP_ENV] = str(step)
    os.environ[_RETRIEVAL_ENV] = f"http://{local}:{port}/kb"
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *([path] if path else [])])
    engine = EngineProcess(_ENGINE, socket_path=os.path.join(folder, "engine.sock"))
    gunicorn: subprocess.Popen[bytes] | None = None
    interrupts = Interrupts()
    interrupts.install()
    try:
        try:
            engine.start()
        except RuntimeError as exc:  # it exited: its own line on stderr says why
            raise CommandError(f"the engine process did not start: {exc}") from None
        argv = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "16"]
        argv += ["-w", str(workers), "--bind", f"fd://{sock.fileno()}"]
        argv += ["--graceful-timeout", f"{max(args.drain_timeout, 1.0):g}"]
        argv += ["--log-level", "warning", "-c", f"python:{__name__}", _APP]
        gunicorn = subprocess.Popen(argv, pass_fds=(sock.fileno(),), start_new_session=True)
        sock.close()  # gunicorn holds it now
        _wait_served(base, gunicorn)
        say(
            f"serving the Flask example app on {base}/ with {workers} gunicorn "
            f"workers sharing one engine process (pid {_engine_pid(engine.socket_path)}, "
            f"socket {engine.socket_path}); Ctrl-C to stop"
        )
        print(
            f"  One simulated model for every worker: each worker submits to the engine\n"
            f"  process, whose batches mix their requests. Each answer names its worker:\n"
            f"    curl -sN -D - '{base}/v1/stream?prompt=Hello&max_tokens=8' | grep -i "
            f"{WORKER_PID_HEADER.lower()}\n"
            f"  and {base}/stats on any worker shows the engine process's counters, the host's.",
            flush=True,
        )
        if not args.no_preview:
            import threading

            threading.Thread(target=preview, args=(base, args.tokens), daemon=True).start()
        while not interrupts.first.wait(0.5):
            if gunicorn.poll() is not None:
                raise CommandError(f"gunicorn exited with {gunicorn.returncode}")
        say("stopping: the workers finish their open streams (Ctrl-C again to stop now)")
        gunicorn.send_signal(signal.SIGTERM)  # graceful: open responses run to their end
        while gunicorn.poll() is None:
            if interrupts.second.wait(0.2):
                gunicorn.send_signal(signal.SIGQUIT)  # gunicorn's quick shutdown
                gunicorn.wait(30)
                return 130
        return 0
    finally:
        if gunicorn is not None and gunicorn.poll() is None:
            gunicorn.kill()
            gunicorn.wait(10)
        sock.close()
        engine.stop()
        shutil.rmtree(folder, ignore_errors=True)
        say("stopped")
