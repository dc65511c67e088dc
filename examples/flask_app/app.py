"""A small, realistic Flask app on llmbridge.

Endpoints:

* ``GET  /``              a page streaming several completions side by side (SSE), with
  a timeline, a "leave early" button per card, the stats and a curl line per endpoint
* ``POST /v1/complete``   JSON in, JSON out: ``{"prompt": ..., "max_tokens": 32}``
* ``GET|POST /v1/stream`` server-sent events (``GET ?prompt=...`` for ``EventSource``)
* ``POST /v1/answer``     an ``async def`` view: fetches context over HTTP with one
  module-level ``httpx.AsyncClient`` from ``EXAMPLE_RETRIEVAL_URL``, then asks the engine
* ``POST /v1/tokens``     a blocking, GIL-holding client call, offloaded to a process
* ``GET  /kb/<topic>``    the "knowledge base" ``/v1/answer`` reads by default
* ``GET  /stats``         engine counters (and the simulated generator's, if any)

It runs on the simulated engine unless given another one. Configuration comes from
``FLASK_*`` environment variables (Flask's ``from_prefixed_env``), e.g.
``FLASK_EXAMPLE_STEP_TIME=0.05`` or ``FLASK_LLMBRIDGE_HEARTBEAT=5``.

Code people copy, so it is careful with what a client sends: the retrieval upstream is
configuration, never derived from the request (a ``Host`` header must not pick the URL
the server fetches); ``topic`` is checked against a short alphabet and sent as one
encoded path segment; every field is checked, unknown ones are refused rather than
ignored, and each mistake is a 400 ``application/problem+json`` saying what to send.
An upstream that can't be reached or answers nonsense is a 502, with the cause in the
server log only.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

import httpx
from flask import Flask, Response, current_app, render_template, request
from werkzeug.exceptions import HTTPException, NotFound, ServiceUnavailable
from werkzeug.wrappers import Response as WerkzeugResponse

from llmbridge import BadRequest, Submitter, UpstreamError
from llmbridge.flask import FlaskBridge
from llmbridge.testing import SimulatedGenerator, simulated_engine

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
    # Where /v1/answer fetches context (``{url}/{topic}``), e.g. "http://127.0.0.1:8000/kb".
    # None: /v1/answer answers 503. Never taken from the request (see the docstring).
    "EXAMPLE_RETRIEVAL_URL": None,
    "EXAMPLE_TOKENIZER_DELAY": 0.05,  # seconds the GIL-holding tokenizer holds the GIL
}


def create_app(config: dict[str, Any] | None = None, *, engine: Submitter | None = None) -> Flask:
    """Build the example app: ``config`` overrides ``FLASK_*`` environment variables,
    which override :data:`DEFAULTS`; ``engine`` defaults to a simulated engine."""
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    app.config.from_prefixed_env()
    app.config.update(config or {})
    retrieval = app.config["EXAMPLE_RETRIEVAL_URL"]
    if retrieval is not None and not str(retrieval).startswith(("http://", "https://")):
        raise ValueError(f"EXAMPLE_RETRIEVAL_URL must be an http(s) URL, got {retrieval!r}")
    if engine is None:
        engine = simulated_engine(
            step_time=float(app.config["EXAMPLE_STEP_TIME"]),
            max_new_tokens=int(app.config["EXAMPLE_MAX_NEW_TOKENS"]),
        )
    bridge.init_app(app, engine=engine)

    @app.errorhandler(HTTPException)
    def http_errors(error: HTTPException) -> WerkzeugResponse | HTTPException:
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
    try:
        body = request.get_json(silent=True, force=True)
    except RecursionError:  # `silent` covers malformed JSON, not JSON nested too deep
        raise BadRequest("the body nests too deeply: send a flat JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object, like {"prompt": "Hello"}')
    return body


def query_args() -> dict[str, str]:
    """The query string as a dict (one value per name), for ``GET`` forms of endpoints."""
    return request.args.to_dict()


def check_fields(body: dict[str, Any], *allowed: str) -> None:
    """Refuse fields the endpoint doesn't read: a misspelt option must not be ignored."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        names = ", ".join(shown(name) for name in unknown[:5])
        accepted = ", ".join(f'"{name}"' for name in allowed)
        raise BadRequest(f"unknown field {names}: this endpoint accepts {accepted}")


def text_field(body: dict[str, Any], name: str) -> str:
    """A required, non-empty string field."""
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f'"{name}" is required and must be a non-empty string')
    return value


INTEGER = re.compile(r"[+-]?[0-9]{1,19}")


def shown(value: Any) -> str:
    """``repr(value)``, cut short: an error message quotes what was sent, not all of it."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer_field(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    """An optional integer field within ``[low, high]``. A JSON body must send a
    number; a query string sends text, which is parsed here."""
    value = body.get(name)
    if value is None:
        return None
    if request.method == "GET" and isinstance(value, str) and INTEGER.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f'"{name}" must be an integer from {low} to {high}, got {shown(value)}')
    if not low <= value <= high:
        raise BadRequest(f'"{name}" must be from {low} to {high}, got {value}')
    return value


GENERATION_FIELDS = ("max_tokens", "max_new_tokens", "seed")


def generation_params(body: dict[str, Any]) -> dict[str, Any]:
    """``max_tokens`` (or the engine's own name, ``max_new_tokens``) and ``seed`` from the
    request, checked."""
    params: dict[str, Any] = {}
    limit = int(current_app.config["EXAMPLE_MAX_TOKENS_LIMIT"])
    max_tokens = integer_field(body, "max_tokens", 1, limit)
    max_new_tokens = integer_field(body, "max_new_tokens", 1, limit)
    if max_tokens is not None and max_new_tokens is not None and max_tokens != max_new_tokens:
        raise BadRequest('send "max_tokens" or "max_new_tokens", not two different values')
    length = max_tokens if max_tokens is not None else max_new_tokens
    if length is not None:
        params["max_new_tokens"] = length
    seed = integer_field(body, "seed", 0, 2**63 - 1)
    if seed is not None:
        params["seed"] = seed
    return params


# A topic names one document: a short word, so it can never become a path or a query.
TOPIC = re.compile(r"[A-Za-z0-9_-]{1,64}")


def topic_field(body: dict[str, Any]) -> str:
    """The optional ``topic`` (default ``"engines"``), checked against :data:`TOPIC`."""
    topic = body.get("topic", "engines")
    if not isinstance(topic, str) or not TOPIC.fullmatch(topic):
        raise BadRequest(f'"topic" must be 1 to 64 letters, digits, "-" or "_", got {shown(topic)}')
    return topic


# -- views ---------------------------------------------------------------------------


def index() -> str:
    """Several streams side by side, with a timeline, the stats and every endpoint."""
    engine = bridge.engine
    generator = getattr(getattr(engine, "backend", None), "generator", None)
    return render_template(
        "index.html",
        simulated=isinstance(generator, SimulatedGenerator),
        step_ms=round(float(current_app.config["EXAMPLE_STEP_TIME"]) * 1000),
        engine_name=getattr(engine, "name", type(engine).__name__),
    )


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
        raise NotFound(f"no document about {shown(topic)}")
    return {"topic": topic, "text": text}


def complete() -> dict[str, Any]:
    """``{"prompt": ...}`` → the whole completion, with usage."""
    body = json_body()
    check_fields(body, "prompt", *GENERATION_FIELDS)
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
    body = query_args() if request.method == "GET" else json_body()
    check_fields(body, "prompt", *GENERATION_FIELDS)
    return bridge.sse(text_field(body, "prompt"), **generation_params(body))


async def answer() -> dict[str, Any]:
    """An async view: fetch context with the module-level client, then generate.

    Runs on the bridge's one background loop, so ``http`` keeps its connections between
    requests instead of failing with "Event loop is closed". The upstream is
    ``EXAMPLE_RETRIEVAL_URL`` (configuration); ``topic`` is one encoded path segment.
    """
    body = json_body()
    check_fields(body, "question", "topic", *GENERATION_FIELDS)
    question = text_field(body, "question")
    topic = topic_field(body)
    params = generation_params(body)
    base = current_app.config["EXAMPLE_RETRIEVAL_URL"]
    if base is None:
        raise ServiceUnavailable(
            "retrieval is not configured: set FLASK_EXAMPLE_RETRIEVAL_URL to the knowledge "
            "base's URL, e.g. http://127.0.0.1:8000/kb"
        )
    context = await retrieve(f"{str(base).rstrip('/')}/{quote(topic, safe='')}", topic)
    text = await bridge.agenerate(f"{context}\n\nQ: {question}\nA:", **params)
    return {"answer": text, "context": context}


async def retrieve(url: str, topic: str) -> str:
    """The ``text`` of the document at ``url``. An upstream that can't be reached, fails
    or answers something else than ``{"text": "..."}`` is :class:`llmbridge.UpstreamError`
    (502; what went wrong goes to the log, not to the client)."""
    try:
        reply = await http.get(url)
    except httpx.HTTPError as exc:
        current_app.logger.warning("retrieval from %s failed: %r", url, exc)
        raise UpstreamError(
            f"retrieval from {url} failed: {exc!r}",
            retryable=True,
            summary="the retrieval upstream could not be reached",
        ) from exc
    if reply.status_code == 404:
        raise NotFound(f"no document about {shown(topic)}")
    try:
        reply.raise_for_status()
        text = reply.json()["text"]
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}")
    except (httpx.HTTPStatusError, ValueError, KeyError, TypeError) as exc:
        current_app.logger.warning("retrieval from %s answered badly: %r", url, exc)
        raise UpstreamError(
            f"retrieval from {url} answered badly: {exc!r}",
            upstream_status=reply.status_code,
            summary="the retrieval upstream answered with an error",
        ) from exc
    return text


def tokens() -> dict[str, Any]:
    """A GIL-holding client call, offloaded to a worker process so it can't freeze the
    other requests of this worker."""
    body = json_body()
    check_fields(body, "text")
    text = text_field(body, "text")
    count = bridge.to_process(
        slow.count_tokens, text, float(current_app.config["EXAMPLE_TOKENIZER_DELAY"])
    )
    return {"tokens": count}
