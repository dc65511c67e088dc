"""A Flask app for the admission tests under a real server: one backend slot, a token
bound on the queue, ``X-Priority`` and the ``/v1`` ``priority`` field opted in.

``GET /gen?prompt=...`` generates (the prompt ``gate`` holds the one slot until
``GET /release``); ``GET /state`` says which prompts the backend ran, in order, and the
engine's counters; ``GET /reset`` forgets the order and re-arms the gate.
"""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask, jsonify, request

from llmbridge import Engine
from llmbridge.backends import CallableBackend
from llmbridge.flask import FlaskBridge
from llmbridge.openai import Settings, flask_blueprint

order: list[str] = []
gate = threading.Event()


def generate(prompt: str, **params: Any) -> str:
    order.append(prompt)
    if prompt == "gate":
        gate.wait(60)
    return "ok"


engine = Engine(
    CallableBackend(generate, max_concurrency=1), max_queued_tokens=100, name="admission"
)
app = Flask(__name__)
bridge = FlaskBridge(app, engine=engine, heartbeat=None, priority_levels=4)
app.register_blueprint(flask_blueprint(engine, settings=Settings(priority_levels=4), auth=None))


@app.get("/gen")
def gen() -> Any:
    tokens = int(request.args.get("n", "1"))
    return {"text": bridge.generate(request.args["prompt"], max_new_tokens=tokens)}


@app.get("/release")
def release() -> Any:
    gate.set()
    return {"released": True}


@app.get("/reset")
def reset() -> Any:
    order.clear()
    gate.clear()
    return {"reset": True}


@app.get("/state")
def state() -> Any:
    return jsonify(
        order=order,
        queued=engine.queued,
        queued_tokens=engine.queued_tokens,
        taken=engine.stats.submitted,
    )
