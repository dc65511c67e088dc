"""The shared-engine app over the transformers backend (tests/test_host_transformers.py):
the tiny GPT-2 of tests/test_transformers_backend.py, built only where ``shared_engine``
builds an engine. Each build appends ``{"loaded": pid}`` to ``HOST_APPS_RECORD``."""

from __future__ import annotations

import json
import os
from typing import Any

import flask

from llmbridge import Engine
from llmbridge.flask import FlaskBridge
from llmbridge.gunicorn import shared_engine


def record(line: dict[str, Any]) -> None:
    path = os.environ.get("HOST_APPS_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def make_engine() -> Engine:
    """The tiny model and its engine: runs in the engine process only."""
    from test_transformers_backend import make_model, make_tokenizer

    from llmbridge.backends import transformers_backend

    record({"loaded": os.getpid()})
    return Engine(transformers_backend(make_model(), make_tokenizer(), max_batch_size=16))


engine = shared_engine(make_engine)

flask_app = flask.Flask(__name__)
bridge = FlaskBridge(flask_app, engine=engine)


@flask_app.get("/sse")
def sse() -> Any:
    args = flask.request.args
    return bridge.sse(args.get("p", "hello"), max_new_tokens=int(args.get("n", "12")))
