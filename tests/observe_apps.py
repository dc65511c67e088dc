"""Apps for the metrics, request-log and tracing tests, served by real servers.

Environment: ``OBS_LOG`` (a file: the ``llmbridge.request`` lines as JSON),
``OBS_METRICS_PATH`` (the bridges' ``metrics_path``, ``/metrics`` by default; empty:
off), ``OBS_MAX_QUEUED`` and ``OBS_MAX_BATCH`` (the engine's bounds), ``OBS_PIPELINE``
(``1``: a Pipeline with a memory cache and a 2-per-minute rate limit in front of the
engine), ``OBS_TRACE`` (a file: finished spans as JSON
lines, through the bridges' ``tracing`` option and the OpenTelemetry SDK).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from llmbridge import Engine, JsonLogFormatter, Request
from llmbridge.backends import StepBackend
from llmbridge.openai import ApiKeys, Principal
from llmbridge.testing import SimulatedGenerator

#: The API key the /v1 routes accept.
OPENAI_KEY = "sk-observe-test"

#: The backend job ids the generator was given, in order (served at /seen).
SEEN: list[str] = []
_seen_lock = threading.Lock()


def _log_to(path: str | None) -> None:
    if not path:
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("llmbridge.request")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _trace_to(path: str | None) -> None:
    if not path:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class FileExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            with open(path, "a") as out:
                for span in spans:
                    assert isinstance(span, ReadableSpan)
                    out.write(span.to_json(indent=None) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)


def make_engine() -> Engine:
    generator = SimulatedGenerator(step_time=0.002, max_new_tokens=4)

    def make_job(request: Request) -> Any:
        job = generator.make_job(request)
        with _seen_lock:
            SEEN.append(job.identifier)
        return job

    backend = StepBackend(
        generator, make_job, max_batch_size=int(os.environ.get("OBS_MAX_BATCH", "64"))
    )
    return Engine(backend, max_queued=int(os.environ.get("OBS_MAX_QUEUED", "1024")), name="obs")


def _options() -> dict[str, Any]:
    options: dict[str, Any] = {}
    options["metrics_path"] = os.environ.get("OBS_METRICS_PATH", "/metrics") or None
    if os.environ.get("OBS_TRACE"):
        options["tracing"] = True
    return options


def _submitter(engine: Engine) -> Any:
    if os.environ.get("OBS_PIPELINE") != "1":
        return engine
    from llmbridge.policies import Pipeline, RateLimit

    return Pipeline(
        engine,
        cache="memory",
        rate_limit=RateLimit(requests_per_minute=2, key=lambda request: "k"),
    )


def _params(body: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": 0}
    for name in ("max_new_tokens", "error_after"):
        if name in body:
            params[name] = body[name]
    return params


def flask_app() -> Any:
    """A Flask app: /generate (JSON), /sse, /seen, /v1 (OpenAI routes), /metrics."""
    from flask import Flask, g, request

    from llmbridge.flask import FlaskBridge
    from llmbridge.openai import flask_blueprint

    _log_to(os.environ.get("OBS_LOG"))
    _trace_to(os.environ.get("OBS_TRACE"))
    engine = make_engine()
    submitter = _submitter(engine)
    app = Flask(__name__)
    bridge = FlaskBridge(app, engine=submitter, **_options())
    app.register_blueprint(flask_blueprint(engine, auth=ApiKeys([OPENAI_KEY])))

    @app.before_request
    def authenticate() -> None:
        # What an authentication layer does: the principal's key id, for the log line.
        if "X-Key-Id" in request.headers:
            g.llmbridge_principal = Principal(request.headers["X-Key-Id"])

    @app.after_request
    def worker(response: Any) -> Any:
        response.headers["X-Worker-Pid"] = str(os.getpid())
        return response

    @app.post("/generate")
    def generate() -> Any:
        body = request.get_json(force=True)
        return {"text": bridge.generate(body.get("prompt", "hi"), **_params(body))}

    @app.post("/sse")
    def sse() -> Any:
        body = request.get_json(force=True)
        return bridge.sse(body.get("prompt", "hi"), **_params(body))

    @app.get("/seen")
    def seen() -> Any:
        with _seen_lock:
            return {"ids": list(SEEN)}

    return app


def quart_app() -> Any:
    """The Quart twin: /generate, /sse, /seen, /metrics."""
    from quart import Quart, g, request

    from llmbridge.quart import QuartBridge

    _log_to(os.environ.get("OBS_LOG"))
    _trace_to(os.environ.get("OBS_TRACE"))
    engine = make_engine()
    app = Quart(__name__)
    bridge = QuartBridge(app, engine=_submitter(engine), handle_signals=False, **_options())

    @app.before_request
    async def authenticate() -> None:
        if "X-Key-Id" in request.headers:
            g.llmbridge_principal = Principal(request.headers["X-Key-Id"])

    @app.post("/generate")
    async def generate() -> Any:
        body = await request.get_json(force=True)
        return {"text": await bridge.generate(body.get("prompt", "hi"), **_params(body))}

    @app.post("/sse")
    async def sse() -> Any:
        body = await request.get_json(force=True)
        return await bridge.sse(body.get("prompt", "hi"), **_params(body))

    @app.get("/seen")
    async def seen() -> Any:
        with _seen_lock:
            return json.dumps({"ids": list(SEEN)}), 200, {"Content-Type": "application/json"}

    return app


def asgi_app() -> Any:
    """The Flask app through llmbridge.asgi (streams pumped on the server's loop)."""
    from llmbridge.asgi import to_asgi

    return to_asgi(flask_app())
