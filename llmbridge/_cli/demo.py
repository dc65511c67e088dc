"""``llmbridge demo``: serve the example Flask app (``examples/flask_app``) on a simulated
engine, from a clone of the repository.

The first ``Ctrl-C`` (or SIGTERM) stops accepting connections and lets the open
responses finish, saying how many; a second one ends them at once (each stream gets a
final ``event: error``) and exits 130, without a traceback.

``--shared-engine [--workers N]`` serves it the way a model is deployed behind several
workers instead: N gunicorn workers sharing one engine process (:mod:`.demo_shared`).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .console import Interrupts, listen, preview, say
from .main import CommandError, checkout

__all__ = ["HELP", "add_arguments", "run"]

HELP = "serve the example Flask app on a simulated engine (from a clone)"


#: Seconds per simulated token: slow enough to watch the cards stream side by side.
STEP_TIME = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--no-preview", action="store_true", help="skip the terminal preview")
    parser.add_argument("--tokens", type=int, default=12, help="tokens per preview stream")
    parser.add_argument(
        "--step-time",
        type=float,
        default=None,
        help=f"seconds per simulated token (default {STEP_TIME}, or FLASK_EXAMPLE_STEP_TIME)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds the first Ctrl-C waits for open streams (default 60)",
    )
    parser.add_argument(
        "--shared-engine",
        action="store_true",
        help="run the app on gunicorn workers that share one engine process, as "
        "docs/howto/shared_engine.md deploys a model (each answer names its worker)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="gunicorn workers with --shared-engine (default 2)",
    )
    parser.add_argument(
        "--no-threads",
        action="store_true",
        help="serve one request at a time, like `flask run --without-threads`: the "
        "page's streams then queue behind each other",
    )


class OpenResponses:
    """WSGI middleware counting the responses still being sent; thread-safe.

    A response counts from the app's call until the server closes its body, so a
    stream is counted until its last byte has gone out, not just until its job ended.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self._count = 0
        self._idle = threading.Condition()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        with self._idle:
            self._count += 1
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self._done()
            raise
        return self._tracked(body)

    def _tracked(self, body: Iterable[bytes]) -> Iterator[bytes]:
        # A generator: the server's close() runs the finally, which closes the app's
        # body (so a client that left still cancels its job) and uncounts it.
        try:
            yield from body
        finally:
            try:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
            finally:
                self._done()

    def _done(self) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    @property
    def count(self) -> int:
        """How many responses are open now."""
        with self._idle:
            return self._count

    def wait_idle(self, timeout: float) -> bool:
        """Block until no response is open or ``timeout`` passes; True if idle."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; blocks. Returns 0 after a drain, 130 after a second Ctrl-C."""
    if args.workers is not None and not args.shared_engine:
        raise CommandError("--workers needs --shared-engine (one process serves otherwise)")
    if args.shared_engine:
        from .demo_shared import run_shared

        step = args.step_time
        if step is None:
            step = float(os.environ.get("FLASK_EXAMPLE_STEP_TIME") or STEP_TIME)
        return run_shared(args, step)
    root = checkout("examples/flask_app", what="the demo serves examples/flask_app")
    sys.path.insert(0, str(root))
    from werkzeug.serving import make_server

    from examples.flask_app import bridge, create_app

    config: dict[str, Any] = {}
    if args.step_time is not None:
        config["EXAMPLE_STEP_TIME"] = args.step_time
    elif "FLASK_EXAMPLE_STEP_TIME" not in os.environ:
        config["EXAMPLE_STEP_TIME"] = STEP_TIME
    app = create_app(config)
    sock = listen(args.host, args.port)
    tracked = OpenResponses(app.wsgi_app)
    app.wsgi_app = tracked  # type: ignore[method-assign]
    server = make_server(args.host, args.port, app, threaded=not args.no_threads, fd=sock.fileno())
    sock.close()  # werkzeug serves on its own duplicate of the descriptor
    base = f"http://{args.host}:{server.port}"
    # /v1/answer reads its context from this app's own /kb unless told otherwise: set
    # here, from the address we bound, never from what a request says the host is.
    if app.config["EXAMPLE_RETRIEVAL_URL"] is None:
        local = "127.0.0.1" if args.host in ("", "0.0.0.0", "::") else args.host
        local = f"[{local}]" if ":" in local else local
        app.config["EXAMPLE_RETRIEVAL_URL"] = f"http://{local}:{server.port}/kb"
    step = float(app.config["EXAMPLE_STEP_TIME"])
    say(f"serving the Flask example app on {base}/ (Ctrl-C to stop)")
    print(
        f"  The engine is simulated: a stand-in model that streams filler words, one every\n"
        f"  {step * 1000:.0f} ms, so the text is not meant to make sense. Plug in a real one with\n"
        f"  create_app(engine=Engine(...)): see docs/howto/start_local_model.md.\n"
        f"  Try: curl -N '{base}/v1/stream?prompt=Hello&max_tokens=16'",
        flush=True,
    )

    interrupts = Interrupts()
    interrupts.install()
    serving = threading.Thread(target=server.serve_forever, name="demo-server", daemon=True)
    serving.start()
    if not args.no_preview:
        threading.Thread(target=preview, args=(base, args.tokens), daemon=True).start()
    while not interrupts.first.wait(0.5):
        pass

    server.shutdown()  # stop accepting: the open responses carry on, on their threads
    server.server_close()
    open_now = tracked.count
    if open_now:
        say(f"draining {_plural(open_now, 'stream')} (Ctrl-C again to stop now)")
    deadline = time.monotonic() + max(args.drain_timeout, 0.0)
    while not tracked.wait_idle(0.2):
        if interrupts.second.is_set() or time.monotonic() >= deadline:
            break
    status = 0
    if tracked.count:
        ending = f"ending {_plural(tracked.count, 'open stream')}"
        if interrupts.second.is_set():
            status = 130
            say(f"stopping now: {ending}")
        else:
            say(f"the drain timeout ({args.drain_timeout:g} s) passed: {ending}")
    # Close on a helper thread: a third Ctrl-C still finds the main thread free, and
    # the engine's close(0) ends what is left with EngineClosed (a final error event).
    closing = threading.Thread(target=_close, args=(bridge, tracked), daemon=True)
    closing.start()
    while closing.is_alive():
        closing.join(0.2)
    say("stopped")
    return status


def _close(bridge: Any, tracked: OpenResponses) -> None:
    for engine in bridge.engines:
        engine.close(0 if tracked.count else None)
    tracked.wait_idle(2.0)  # let the cut-short streams send their final event
