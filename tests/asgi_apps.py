"""A Flask app with the bridge, served through llmbridge.asgi by real servers in tests.

``/body/<accessor>`` (a sync view) and ``/abody/<accessor>`` (an ``async def`` view,
run on the bridge's background loop) echo the request body read through one of Flask's
accessors. ``/v1/chat/completions`` is the OpenAI blueprint. ``/unknown`` streams from
an engine the adapter is not told about, iterated on the worker thread as under a WSGI
middleware that wraps the response: only the drain's own record of open bodies can end
it.

Environment: ``ASGI_TEST_WORKERS`` (thread pool size, 4), ``ASGI_TEST_DRAIN`` (drain
timeout, 2 s), ``ASGI_TEST_STEP`` (engine step time, 0.01 s), ``ASGI_TEST_SHUTDOWN_FILE``
(the shutdown hook appends ``shutdown <pid>`` there).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

from llmbridge._web.body import ASYNC_BODY_KEY, StreamBody
from llmbridge.asgi import to_asgi
from llmbridge.flask import FlaskBridge
from llmbridge.openai import flask_blueprint
from llmbridge.testing import simulated_engine

engine = simulated_engine(
    step_time=float(os.environ.get("ASGI_TEST_STEP", "0.01")),
    batch_exponent=0.0,
    max_batch_size=512,
)
flask_app = Flask(__name__)
bridge = FlaskBridge(flask_app, engine=engine, heartbeat=None)
# /v1: the OpenAI routes over the same engine; their streams reach the adapter as
# StreamBody through ASYNC_BODY_KEY, like bridge.sse().
flask_app.register_blueprint(flask_blueprint(engine, auth=None))
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


# Not the bridge's engine: the adapter neither starts nor closes it.
unknown_engine = simulated_engine(step_time=0.01, batch_exponent=0.0)


@flask_app.get("/unknown")
def unknown() -> Response:
    stream = unknown_engine.submit(request.args["prompt"], max_new_tokens=100_000)
    handle = request.environ[ASYNC_BODY_KEY](StreamBody(stream, heartbeat=None))

    def wrapped() -> Iterator[bytes]:  # what a response-wrapping middleware does
        try:
            yield from handle
        finally:
            handle.close()

    return Response(wrapped(), content_type="text/event-stream")


def read_body(accessor: str) -> Any:
    """The request body through one of Flask's accessors, as JSON-able data."""
    if accessor == "get_json":
        return request.get_json()
    if accessor == "json":
        return request.json
    if accessor == "form":
        return request.form.to_dict()
    if accessor == "files":
        return {name: file.read().decode() for name, file in request.files.items()}
    if accessor == "data":
        return request.data.decode()
    if accessor == "get_data":
        return request.get_data(as_text=True)
    if accessor == "stream":
        return request.stream.read().decode()
    raise LookupError(accessor)


@flask_app.post("/body/<accessor>")
def body_sync(accessor: str) -> Response:
    return jsonify(got=read_body(accessor), thread=threading.current_thread().name)


@flask_app.post("/abody/<accessor>")
async def body_async(accessor: str) -> Response:
    asyncio.get_running_loop()  # an async view: it runs on a loop
    return jsonify(got=read_body(accessor), thread=threading.current_thread().name)


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


def _mount_app() -> Flask:
    """A bare Flask app that reports where it thinks it is mounted."""
    mounted = Flask("mounted")

    @mounted.get("/hello")
    def hello() -> Response:
        return jsonify(script_root=request.script_root, path=request.path)

    return mounted


def __getattr__(name: str) -> Any:
    # ``mount_<adapter>``: the same app under each adapter, built only when asked for.
    if name == "mount_ours":
        return to_asgi(_mount_app())
    if name == "mount_asgiref":
        from asgiref.wsgi import WsgiToAsgi

        return WsgiToAsgi(_mount_app())
    if name == "mount_a2wsgi":
        from a2wsgi import WSGIMiddleware

        return WSGIMiddleware(_mount_app())
    raise AttributeError(name)
