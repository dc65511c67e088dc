"""A small, realistic Flask app on llmbridge.

Endpoints:

* ``GET  /``              a page streaming several completions side by side (SSE)
* ``POST /v1/complete``   JSON in, JSON out: ``{"prompt": ..., "max_tokens": 32}``
* ``GET|POST /v1/stream`` server-sent events (``GET ?prompt=...`` for ``EventSource``)
* ``POST /v1/answer``     an ``async def`` view: fetches context over HTTP with one
  module-level ``httpx.AsyncClient``, then asks the engine
* ``POST /v1/tokens``     a blocking, GIL-holding client call, offloaded to a process
* ``GET  /kb/<topic>``    the "knowledge base" ``/v1/answer`` reads by default
* ``GET  /stats``         engine counters (and the simulated generator's, if any)

It runs on the simulated engine unless given another one. Configuration comes from
``FLASK_*`` environment variables (Flask's ``from_prefixed_env``), e.g.
``FLASK_EXAMPLE_STEP_TIME=0.05`` or ``FLASK_LLMBRIDGE_HEARTBEAT=5``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from flask import Flask, Response, current_app, render_template, request
from werkzeug.exceptions import HTTPException, NotFound

from llmbridge import BadRequest, Submitter
from llmbridge.flask import FlaskBridge
from llmbridge.testing import simulated_engine

from . import slow

bridge = FlaskBridge()

# One client for the whole process: its connection pool lives on the bridge's loop, and
# every request (from any thread) reuses its connections.
http = httpx.AsyncClient(
    timeout=httpx.Timeout(10.0),
    limits=httpx.Limits(max_connections=20, max_keepalive_connections=20),
)

KNOWLEDGE = {
    "engines": "An engine owns the model on one thread; requests only submit work.",
    "streams": "Each request reads its own stream, from a thread or a coroutine.",
    "offload": "Calls that hold the GIL run in a worker process, not a request thread.",
}

DEFAULTS: dict[str, Any] = {
    "EXAMPLE_STEP_TIME": 0.02,  # seconds per simulated decoding step
    "EXAMPLE_MAX_NEW_TOKENS": 48,  # default completion length
    "EXAMPLE_MAX_TOKENS_LIMIT": 4096,  # largest max_tokens a client may ask for
    "EXAMPLE_RETRIEVAL_URL": None,  # where /v1/answer fetches context; None: this app
    "EXAMPLE_TOKENIZER_DELAY": 0.05,  # seconds the GIL-holding tokenizer holds the GIL
}


def create_app(config: dict[str, Any] | None = None, *, engine: Submitter | None = None) -> Flask:
    """Build the example app: ``config`` overrides ``FLASK_*`` environment variables,
    which override :data:`DEFAULTS`; ``engine`` defaults to a simulated engine."""
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    app.config.from_prefixed_env()
    app.config.update(config or {})
    if engine is None:
        engine = simulated_engine(
            step_time=float(app.config["EXAMPLE_STEP_TIME"]),
            max_new_tokens=int(app.config["EXAMPLE_MAX_NEW_TOKENS"]),
        )
    bridge.init_app(app, engine=engine)

    @app.errorhandler(HTTPException)
    def http_errors(error: HTTPException) -> Response | HTTPException:
        # The JSON endpoints answer errors in JSON too; the HTML page keeps Flask's.
        if request.path == "/":
            return error
        body = {
            "type": "about:blank",
            "title": error.name,
            "status": error.code,
            "detail": error.description,
        }
        response = error.get_response()
        response.set_data(json.dumps(body))
        response.content_type = "application/problem+json"
        return response

    app.add_url_rule("/", view_func=index)
    app.add_url_rule("/healthz", view_func=healthz)
    app.add_url_rule("/stats", view_func=stats)
    app.add_url_rule("/kb/<topic>", view_func=knowledge)
    app.add_url_rule("/v1/complete", view_func=complete, methods=["POST"])
    app.add_url_rule("/v1/stream", view_func=stream, methods=["GET", "POST"])
    app.add_url_rule("/v1/answer", view_func=answer, methods=["POST"])
    app.add_url_rule("/v1/tokens", view_func=tokens, methods=["POST"])
    return app


# -- request parsing: every mistake is a 400 problem, never a traceback page -----------


def json_body() -> dict[str, Any]:
    """The request's JSON object, or :class:`llmbridge.BadRequest`."""
    body = request.get_json(silent=True, force=True)
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object, like {"prompt": "Hello"}')
    return body


def text_field(body: dict[str, Any], name: str) -> str:
    """A required, non-empty string field."""
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f'"{name}" is required and must be a non-empty string')
    return value


def generation_params(body: dict[str, Any]) -> dict[str, Any]:
    """``max_tokens`` and ``seed`` from the request, checked."""
    params: dict[str, Any] = {}
    limit = int(current_app.config["EXAMPLE_MAX_TOKENS_LIMIT"])
    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, str) and max_tokens.isdigit():
            max_tokens = int(max_tokens)  # from a query string
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise BadRequest('"max_tokens" must be an integer')
        if not 1 <= max_tokens <= limit:
            raise BadRequest(f'"max_tokens" must be between 1 and {limit}')
        params["max_new_tokens"] = max_tokens
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BadRequest('"seed" must be an integer')
        params["seed"] = seed
    return params


# -- views ---------------------------------------------------------------------------


def index() -> str:
    """Several streams side by side."""
    return render_template("index.html")


def healthz() -> dict[str, Any]:
    """Liveness."""
    return {"ok": True}


def stats() -> dict[str, Any]:
    """Engine counters, plus the simulated generator's when there is one."""
    engine = bridge.engine
    out: dict[str, Any] = {}
    engine_stats = getattr(engine, "stats", None)
    if engine_stats is not None:
        out["engine"] = engine_stats.as_dict()
    generator = getattr(getattr(engine, "backend", None), "generator", None)
    if generator is not None:
        out["generator"] = {
            "steps": generator.steps,
            "enqueued": generator.enqueued,
            "jobs_in_flight": generator.jobs_in_flight,
            "cancelled": list(generator.cancelled),
            "concurrent_entries": generator.concurrent_entries,
            "max_batch_seen": generator.max_batch_seen,
        }
    return out


def knowledge(topic: str) -> dict[str, str]:
    """A tiny document store, the default upstream of ``/v1/answer``."""
    text = KNOWLEDGE.get(topic)
    if text is None:
        raise NotFound(f"no document about {topic!r}")
    return {"topic": topic, "text": text}


def complete() -> dict[str, Any]:
    """``{"prompt": ...}`` → the whole completion, with usage."""
    body = json_body()
    stream = bridge.submit(text_field(body, "prompt"), **generation_params(body))
    completion = stream.result(current_app.config["LLMBRIDGE_TIMEOUT"])
    return {
        "id": completion.id,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.total_tokens,
        },
    }


def stream() -> Response:
    """Server-sent events: one ``data`` event per chunk, then ``event: done``."""
    body = request.args.to_dict() if request.method == "GET" else json_body()
    return bridge.sse(text_field(body, "prompt"), **generation_params(body))


async def answer() -> dict[str, Any]:
    """An async view: fetch context with the module-level client, then generate.

    Runs on the bridge's one background loop, so ``http`` keeps its connections between
    requests instead of failing with "Event loop is closed".
    """
    body = json_body()
    question = text_field(body, "question")
    topic = body.get("topic", "engines")
    if not isinstance(topic, str):
        raise BadRequest('"topic" must be a string')
    base = current_app.config["EXAMPLE_RETRIEVAL_URL"] or request.host_url.rstrip("/") + "/kb"
    reply = await http.get(f"{base}/{topic}")
    if reply.status_code == 404:
        raise NotFound(f"no document about {topic!r}")
    reply.raise_for_status()
    context = reply.json()["text"]
    text = await bridge.agenerate(f"{context}\n\nQ: {question}\nA:", **generation_params(body))
    return {"answer": text, "context": context}


def tokens() -> dict[str, Any]:
    """A GIL-holding client call, offloaded to a worker process so it can't freeze the
    other requests of this worker."""
    text = text_field(json_body(), "text")
    count = bridge.to_process(
        slow.count_tokens, text, float(current_app.config["EXAMPLE_TOKENIZER_DELAY"])
    )
    return {"tokens": count}
