"""Apps for the health and readiness tests, served by real servers: a Flask app (werkzeug,
gunicorn, and uvicorn through ``llmbridge.asgi``) and a Quart app (hypercorn).

Their engine drives :class:`Steered`, a step generator that the prompts of ``GET /gen``
steer: ``wedge`` blocks one step until ``GET /release``, ``kill`` makes the backend's
serving loop die, ``fail`` fails that request (so two of them open the pipeline's
circuit breaker), ``hold`` stays in flight (short steps, no output) until the server
stops; any other prompt streams a few tokens. ``GET /close`` starts closing the
engine (a Flask app's drain); on the Quart app ``GET /drain`` starts the bridge's drain
as its SIGTERM handler would. Environment: ``HEALTH_STUCK_AFTER`` (0.5 s),
``HEALTH_PREFIX`` (""), ``HEALTH_WARMUP`` (no warm-up), ``HEALTH_DRAIN`` (Quart and ASGI
drain timeout, 30 s).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from flask import Flask, jsonify, request
from quart import Quart
from quart import request as quart_request

from llmbridge import Engine
from llmbridge.asgi import to_asgi
from llmbridge.backends import StepBackend
from llmbridge.flask import FlaskBridge
from llmbridge.policies import CircuitBreaker, Pipeline
from llmbridge.quart import QuartBridge

STUCK_AFTER = float(os.environ.get("HEALTH_STUCK_AFTER", "0.5"))
OPTIONS: dict[str, Any] = {
    "heartbeat": None,
    "stuck_after": STUCK_AFTER,
    "health_prefix": os.environ.get("HEALTH_PREFIX", ""),
    "warmup": os.environ.get("HEALTH_WARMUP") or None,
}
DRAIN = float(os.environ.get("HEALTH_DRAIN", "30"))


class Died(BaseException):
    """Not an Exception: it ends the StepBackend's serving loop, not just a batch."""


class Steered:
    """A step generator steered by its prompts (see the module docstring)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.release = threading.Event()
        self.steps = 0

    def make_job(self, req: Any) -> dict[str, Any]:
        return {"id": req.id, "prompt": req.prompt, "left": req.params.get("max_new_tokens", 3)}

    def enqueue(self, job: dict[str, Any]) -> None:
        self.jobs[job["id"]] = job

    def cancel(self, job: dict[str, Any]) -> None:
        self.jobs.pop(job["id"], None)

    def iterate(self) -> list[dict[str, Any]]:
        self.steps += 1
        results: list[dict[str, Any]] = []
        holding = False
        for job in list(self.jobs.values()):
            prompt = job["prompt"]
            if prompt == "hold":
                holding = True
                continue
            if prompt == "kill":
                raise Died("the backend's serving loop died")
            if prompt == "wedge":
                self.release.wait(60)  # one step that does not end
                job["prompt"] = "wedged"
            if prompt == "fail":
                del self.jobs[job["id"]]
                results.append({"identifier": job["id"], "error": "secret backend text"})
                continue
            job["left"] -= 1
            eos = job["left"] <= 0
            if eos:
                del self.jobs[job["id"]]
            results.append({"identifier": job["id"], "text": "t", "eos": eos})
        if holding:
            time.sleep(0.01)  # a short step: held requests are in flight, not stuck
        return results


def build(name: str) -> tuple[Steered, Engine, Pipeline]:
    gen = Steered()
    engine = Engine(StepBackend(gen, gen.make_job, max_batch_size=8), name=name)
    breaker = CircuitBreaker(failure_ratio=1.0, window=2, min_calls=2, open_for=600)
    return gen, engine, Pipeline(engine, breaker=breaker)


# -- Flask (werkzeug, gunicorn; uvicorn through to_asgi) ------------------------------

flask_gen, flask_engine, flask_pipeline = build("flask-engine")
flask_app = Flask(__name__)
flask_bridge = FlaskBridge(flask_app, engine=flask_pipeline, **OPTIONS)


@flask_app.get("/gen")
def flask_gen_view() -> Any:
    return {"text": flask_bridge.generate(request.args["prompt"])}


@flask_app.get("/release")
def flask_release() -> Any:
    flask_gen.release.set()
    return {"released": True}


@flask_app.get("/close")
def flask_close() -> Any:
    threading.Thread(target=flask_engine.close, args=(30,), daemon=True).start()
    return {"closing": True}


@flask_app.get("/state")
def flask_state() -> Any:
    return jsonify(running=flask_engine.running, steps=flask_gen.steps, pid=os.getpid())


def create_flask_app() -> Flask:
    return flask_app


asgi_app = to_asgi(flask_app, drain_timeout=DRAIN)


# -- Quart (hypercorn) ------------------------------------------------------------------

quart_gen, quart_engine, quart_pipeline = build("quart-engine")
quart_app = Quart(__name__)
quart_bridge = QuartBridge(quart_app, engine=quart_pipeline, drain_timeout=DRAIN, **OPTIONS)


@quart_app.get("/gen")
async def quart_gen_view() -> Any:
    return {"text": await quart_bridge.generate(quart_request.args["prompt"])}


@quart_app.get("/release")
async def quart_release() -> Any:
    quart_gen.release.set()
    return {"released": True}


@quart_app.get("/drain")
async def quart_drain() -> Any:
    # What the bridge's SIGTERM handler does (hypercorn itself stops answering new
    # requests once signalled, so a test could not see the drain from outside).
    quart_bridge.drain.request()
    return {"draining": True}
