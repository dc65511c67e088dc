"""Apps the auth server tests serve with real servers in a subprocess.

``AUTH_APP`` picks the framework: ``flask`` (``auth_apps:app`` under gunicorn,
``auth_apps:asgi`` under uvicorn via ``to_asgi``) or ``quart`` (``auth_apps:app`` under
uvicorn). ``AUTH_MODE`` picks how callers are known: ``file`` (``AUTH_KEYS_FILE``,
re-read on every request), ``env`` (``LLMBRIDGE_API_KEYS``) or ``hook`` (an
``X-User`` header naming one of ``alice`` / ``bob``). ``AUTH_REDIS``: a Redis URL where
the per-key limits and the pipeline's rate limit count (else this process's memory).

Every log record of every logger goes to stdout at DEBUG (``AUTH_LOG_LEVEL``), and
``/metrics`` serves the Prometheus text, so a test can grep everything a request produced for a key.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from llmbridge.asgi import to_asgi
from llmbridge.openai import ApiKeys, Principal, Settings, flask_blueprint, quart_blueprint
from llmbridge.policies import Pipeline, RateLimit
from llmbridge.testing import simulated_engine

logging.basicConfig(level=os.environ.get("AUTH_LOG_LEVEL", "DEBUG"), stream=sys.stdout, force=True)

KIND = os.environ.get("AUTH_APP", "flask")
MODE = os.environ.get("AUTH_MODE", "file")
STORAGE = os.environ.get("AUTH_REDIS", "memory://")
SETTINGS = Settings(models=("sim",), max_tokens_limit=64)
USERS = {"alice": Principal("user-alice", "alice"), "bob": Principal("user-bob", "bob")}

ENGINE = simulated_engine(step_time=0.001, max_new_tokens=8)
# Generous limits: they prove the principal is the pipeline's key (its 429 would name it).
PIPELINE = Pipeline(ENGINE, rate_limit=RateLimit(requests_per_minute=10_000, storage=STORAGE))


def _auth() -> Any:
    if MODE == "file":
        return ApiKeys.from_file(os.environ["AUTH_KEYS_FILE"], storage=STORAGE, reload_interval=0)
    if MODE == "env":
        return ApiKeys.from_env("LLMBRIDGE_API_KEYS", storage=STORAGE)
    if MODE == "hook":
        if KIND == "quart":

            async def authenticate_async(request: Any) -> Principal | None:
                return USERS.get(request.headers.get("X-User", ""))

            return authenticate_async

        def authenticate(request: Any) -> Principal | None:
            return USERS.get(request.headers.get("X-User", ""))

        return authenticate
    raise ValueError(f"unknown AUTH_MODE {MODE!r}")


def _metrics() -> tuple[bytes, str]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    from llmbridge.metrics import LLMBridgeCollector

    registry = CollectorRegistry()
    registry.register(LLMBridgeCollector(ENGINE, name="sim", pipeline=PIPELINE))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def build() -> Any:
    """The app ``AUTH_APP`` names."""
    if KIND == "flask":
        from flask import Flask, Response

        flask_app = Flask(__name__)
        flask_app.register_blueprint(flask_blueprint(PIPELINE, auth=_auth(), settings=SETTINGS))

        @flask_app.get("/metrics")
        def metrics() -> Response:
            body, kind = _metrics()
            return Response(body, content_type=kind)

        return flask_app
    if KIND == "quart":
        from quart import Quart, Response

        quart_app = Quart(__name__)
        bp = quart_blueprint(PIPELINE, auth=_auth(), settings=SETTINGS, handle_signals=False)
        quart_app.register_blueprint(bp)

        @quart_app.get("/metrics")
        async def qmetrics() -> Response:
            body, kind = _metrics()
            return Response(body, content_type=kind)

        return quart_app
    raise ValueError(f"unknown AUTH_APP {KIND!r}")


app = build()
asgi = to_asgi(app) if KIND == "flask" else None
