"""Gateway apps the gateway tests serve with real servers: the ``/v1`` blueprints over
an :class:`~llmbridge.backends.OpenAIBackend` whose upstreams are ``UPSTREAM_URLS``
(comma-separated base URLs, ``/v1`` included).

``GATEWAY_APP``: ``flask`` (``app``, for gunicorn) or ``quart`` (``app``, for uvicorn or
hypercorn). Knobs, all optional: ``MODEL_MAP`` (``client=upstream`` pairs, comma
separated, applied to every upstream), ``GATEWAY_CACHE=1`` (a
:class:`~llmbridge.policies.Pipeline` with a memory cache, non-deterministic requests
included), ``FAILURES`` / ``COOLDOWN`` (the backend's breaker), ``MAX_CONCURRENCY``,
``MAX_CONNECTIONS`` (each upstream's pool),
``PASSTHROUGH=0`` (the routes translate requests instead of forwarding them, and the
backend always streams upstream: how ``/v1`` over ``OpenAIBackend`` worked before
passthrough, for ``benchmarks/gateway_nonstreamed.py``).
"""

from __future__ import annotations

import os
from typing import Any

from llmbridge import Engine
from llmbridge.backends import OpenAIBackend, Upstream
from llmbridge.openai import Settings

MODELS = ("gpt-test", "gpt-mapped")
SETTINGS = Settings(models=MODELS, max_input_chars=100_000, max_tokens_limit=4096)


def _submitter() -> Any:
    pairs = [p.split("=", 1) for p in os.environ.get("MODEL_MAP", "").split(",") if p]
    models = {client: upstream for client, upstream in pairs}
    upstreams = [
        Upstream(url, api_key="sk-upstream", models=models, name=f"u{i}")
        for i, url in enumerate(os.environ["UPSTREAM_URLS"].split(","))
    ]
    backend = OpenAIBackend(
        upstreams=upstreams,
        failures=int(os.environ.get("FAILURES", "3")),
        cooldown=float(os.environ.get("COOLDOWN", "5")),
        max_concurrency=int(os.environ.get("MAX_CONCURRENCY", "256")),
        max_connections=int(os.environ["MAX_CONNECTIONS"])
        if "MAX_CONNECTIONS" in os.environ
        else None,
        timeout=30,
        stream=True,
    )
    engine = Engine(backend)
    if os.environ.get("GATEWAY_CACHE") == "1":
        from llmbridge.policies import MemoryCache, Pipeline

        return Pipeline(engine, cache=MemoryCache(), cache_nondeterministic=True)
    return engine


SUBMITTER = _submitter()
OPTIONS: dict[str, Any] = {"settings": SETTINGS, "auth": None}  # 127.0.0.1 only
if os.environ.get("PASSTHROUGH") == "0":
    OPTIONS["passthrough"] = False
KIND = os.environ.get("GATEWAY_APP", "flask")


def _build() -> Any:
    if KIND == "flask":
        from flask import Flask, jsonify, request

        from llmbridge.flask import FlaskBridge
        from llmbridge.openai import flask_blueprint

        app = Flask(__name__)
        app.register_blueprint(flask_blueprint(SUBMITTER, **OPTIONS))
        bridge = FlaskBridge(app, engine=SUBMITTER)

        @app.post("/chat")
        def chat() -> Any:  # chat in its natural form: no dummy prompt
            return bridge.sse(bridge.chat(request.get_json()["messages"], model="gpt-test"))

        @app.get("/stats")
        def stats() -> Any:
            return jsonify(_backend_stats())

        return app
    from quart import Quart
    from quart import request as qrequest

    from llmbridge.openai import quart_blueprint
    from llmbridge.quart import QuartBridge

    qapp = Quart(__name__)
    qapp.register_blueprint(quart_blueprint(SUBMITTER, **OPTIONS))
    qbridge = QuartBridge(qapp, engine=SUBMITTER)

    @qapp.post("/chat")
    async def qchat() -> Any:
        messages = (await qrequest.get_json())["messages"]
        return await qbridge.sse(qbridge.chat(messages, model="gpt-test"))

    @qapp.get("/stats")
    async def qstats() -> Any:
        return _backend_stats()

    return qapp


def _backend_stats() -> dict[str, Any]:
    engine = getattr(SUBMITTER, "engine", SUBMITTER)
    return dict(engine.backend.stats)


app = _build()
