"""A Flask app with the bridge, served through llmbridge.asgi by real servers in tests.

Environment: ``ASGI_TEST_WORKERS`` (thread pool size, 4), ``ASGI_TEST_DRAIN`` (drain
timeout, 2 s), ``ASGI_TEST_STEP`` (engine step time, 0.01 s), ``ASGI_TEST_SHUTDOWN_FILE``
(the shutdown hook appends ``shutdown <pid>`` there).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from flask import Flask, Response, jsonify, request

from llmbridge._web.body import ASYNC_BODY_KEY, StreamBody
from llmbridge.asgi import to_asgi
from llmbridge.flask import FlaskBridge
from llmbridge.testing import simulated_engine

engine = simulated_engine(
    step_time=float(os.environ.get("ASGI_TEST_STEP", "0.01")),
    batch_exponent=0.0,
    max_batch_size=512,
)
flask_app = Flask(__name__)
bridge = FlaskBridge(flask_app, engine=engine, heartbeat=None)
closes: dict[str, int] = {}


@flask_app.get("/sse")
def sse() -> Response:
    return bridge.sse(request.args["prompt"], max_new_tokens=int(request.args.get("n", 16)))


@flask_app.get("/counted")
def counted() -> Response:
    stream = bridge.stream(request.args["prompt"], max_new_tokens=int(request.args.get("n", 16)))
    closes[stream.id] = 0

    def on_close() -> None:
        closes[stream.id] += 1

    body = StreamBody(stream, heartbeat=None, on_close=on_close)
    return Response(
        request.environ[ASYNC_BODY_KEY](body),
        content_type=body.media_type,
        headers={"X-LLMBridge-Request-Id": stream.id},
        direct_passthrough=True,
    )


@flask_app.get("/stats")
def stats() -> Response:
    generator = engine.backend.generator
    return jsonify(
        pid=os.getpid(),
        cancelled=list(generator.cancelled),
        closes=closes,
        threads=threading.active_count(),
        in_flight=generator.jobs_in_flight,
    )


@flask_app.get("/ping")
def ping() -> str:
    return "pong"


def on_shutdown() -> None:
    path = os.environ.get("ASGI_TEST_SHUTDOWN_FILE")
    if path:
        with Path(path).open("a") as file:
            file.write(f"shutdown {os.getpid()}\n")


app = to_asgi(
    flask_app,
    workers=int(os.environ.get("ASGI_TEST_WORKERS", "4")),
    drain_timeout=float(os.environ.get("ASGI_TEST_DRAIN", "2")),
    on_shutdown=on_shutdown,
)
