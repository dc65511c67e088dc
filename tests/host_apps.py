"""Apps for the shared-engine tests (tests/test_host*.py): one engine module, one Flask
app, under every server.

``engine`` is what ``llmbridge serve host_apps:engine`` loads (built by ``make_engine()``): a
:class:`RecordingGenerator` whose every step appends one JSON line to the file named by
``HOST_APPS_RECORD`` (the step number, the request ids and the ``worker_pid`` params of
the jobs in it), whose cancellations append ``{"cancelled": id, "step": n}``, and whose
loads append ``{"loaded": pid}`` (so a test counts the processes that built a model).
``HOST_APPS_STEP`` is the step time (seconds). A request with ``crash=1`` kills the
engine process in its step.

``flask_app`` / ``asgi_app`` stream ``/sse?p=&n=`` through a ``FlaskBridge`` over
``shared_engine(make_engine)``, passing the worker's pid as a param.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import flask

from llmbridge import Engine
from llmbridge.asgi import to_asgi
from llmbridge.backends import StepBackend
from llmbridge.flask import FlaskBridge
from llmbridge.gunicorn import shared_engine
from llmbridge.testing import SimulatedGenerator, SimulatedJob

_lock = threading.Lock()


def record(line: dict[str, Any]) -> None:
    path = os.environ.get("HOST_APPS_RECORD")
    if path:
        with _lock, open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


class RecordingGenerator(SimulatedGenerator):
    """A SimulatedGenerator that writes what each step held to ``HOST_APPS_RECORD``."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.pids: dict[str, int | None] = {}
        self.crash: set[str] = set()

    def make_job(self, request: Any) -> SimulatedJob:
        job = super().make_job(request)
        self.pids[job.identifier] = request.params.get("worker_pid")
        if request.params.get("crash"):
            self.crash.add(job.identifier)
        return job

    def cancel(self, job: SimulatedJob) -> None:
        super().cancel(job)
        record({"cancelled": job.identifier, "step": self.steps})

    def iterate(self) -> list[dict[str, Any]]:
        ids = list(self._jobs)
        if ids:
            if self.crash & set(ids):
                os._exit(3)  # a crash: no cleanup, no final events from this process
            pids = sorted({p for i in ids if (p := self.pids.get(i)) is not None})
            record({"step": self.steps + 1, "ids": ids, "pids": pids})
        return super().iterate()


def make_engine() -> Engine:
    """The engine the engine process serves (and a worker builds when no socket is set)."""
    record({"loaded": os.getpid()})
    generator = RecordingGenerator(
        step_time=float(os.environ.get("HOST_APPS_STEP", "0.02")),
        batch_exponent=0.0,
        max_new_tokens=16,
    )
    backend = StepBackend(generator, generator.make_job, max_batch_size=256)
    return Engine(backend, max_queued=int(os.environ.get("HOST_APPS_MAX_QUEUED", "1024")))


engine = shared_engine(make_engine)

flask_app = flask.Flask(__name__)
bridge = FlaskBridge(flask_app, engine=engine)


@flask_app.get("/sse")
def sse() -> flask.Response:
    args = flask.request.args
    params: dict[str, Any] = {"max_new_tokens": int(args.get("n", 16))}
    if "crash" in args:
        params["crash"] = 1
    return bridge.sse(args.get("p", "hello"), worker_pid=os.getpid(), **params)


@flask_app.get("/pid")
def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


asgi_app = to_asgi(flask_app)
