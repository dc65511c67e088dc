"""The same small app in Flask and in Quart, for tests/test_bridges.py's real servers.

``flask_app`` and ``quart_app`` have the same routes and answer alike. With
``BRIDGE_APPS_ENGINE=none`` their bridges get no engine (offloading only).

Routes: ``/generate?p=&n=``, ``/sse?p=&n=&fail_after=`` (the backend fails after that
many chunks with an error holding :data:`SECRET`), ``/offload`` (a blocking call past
its 0.2 s timeout), ``/retry?after=`` (``Overloaded`` with that ``retry_after``),
``/hostile`` (an error subclass with an impossible status and ``retry_after``),
``/loop`` (an ``async def`` view: how many loops it ran on so far), ``/conflict`` (409,
answered by the app's own handler registered after the bridge),
``/plain`` (a view that doesn't use the bridge).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import flask
import quart

from llmbridge import Engine, LLMBridgeError, Overloaded
from llmbridge.flask import FlaskBridge
from llmbridge.quart import QuartBridge

#: What the failing backend's exception says: it must never reach a client.
SECRET = "postgresql://admin:hunter2@db.internal:5432/prod"


def chunks(prompt: str) -> list[str]:
    """What the backend streams for ``prompt``: ``n`` numbered words."""
    return [f"{prompt}-{i} " for i in range(8)]


def backend(prompt: str, *, n: int = 8, fail_after: int | None = None) -> Iterator[str]:
    for i, chunk in enumerate(chunks(prompt)[:n]):
        if fail_after is not None and i == fail_after:
            raise ConnectionError(f"could not reach {SECRET}")
        yield chunk
    if fail_after is not None and fail_after >= n:
        raise ConnectionError(f"could not reach {SECRET}")


def params(args: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"n": int(args.get("n", 8))}
    if "fail_after" in args:
        found["fail_after"] = int(args["fail_after"])
    return found


class Hostile(LLMBridgeError):
    """An error a careless subclass could raise: no HTTP status, no number to wait."""

    status = 1000

    def __init__(self) -> None:
        super().__init__("hostile")
        self.retry_after = object()  # type: ignore[assignment]


_loops: list[asyncio.AbstractEventLoop] = []


def count_loops() -> int:
    """How many event loops ``/loop`` ran on so far (held, so no id is reused)."""
    loop = asyncio.get_running_loop()
    if all(seen is not loop for seen in _loops):
        _loops.append(loop)
    return len(_loops)


def _engine() -> Engine | None:
    return None if os.environ.get("BRIDGE_APPS_ENGINE") == "none" else Engine(backend)


# -- Flask ----------------------------------------------------------------------------

flask_app = flask.Flask(__name__)
flask_bridge = FlaskBridge(flask_app, engine=_engine(), heartbeat=None)


@flask_app.get("/generate")
def flask_generate() -> Any:
    return {"text": flask_bridge.generate(flask.request.args["p"], **params(flask.request.args))}


@flask_app.get("/sse")
def flask_sse() -> Any:
    return flask_bridge.sse(flask.request.args["p"], **params(flask.request.args))


@flask_app.get("/offload")
def flask_offload() -> Any:
    flask_bridge.to_thread(time.sleep, 1.0, timeout=0.2)
    return {"slept": True}


@flask_app.get("/loop")
async def flask_loop() -> Any:
    return {"loops": count_loops()}


@flask_app.get("/retry")
def flask_retry() -> Any:
    raise Overloaded("busy", retry_after=float(flask.request.args["after"]))


@flask_app.get("/hostile")
def flask_hostile() -> Any:
    raise Hostile()


@flask_app.get("/conflict")
def flask_conflict() -> Any:
    flask.abort(409)


@flask_app.get("/plain")
def flask_plain() -> Any:
    return {"plain": True}


@flask_app.errorhandler(409)
def flask_conflict_handler(error: Exception) -> Any:
    return {"handled": "conflict"}, 409


# -- Quart ----------------------------------------------------------------------------

quart_app = quart.Quart(__name__)
quart_bridge = QuartBridge(quart_app, engine=_engine(), heartbeat=None)


@quart_app.get("/generate")
async def quart_generate() -> Any:
    args = quart.request.args
    return {"text": await quart_bridge.generate(args["p"], **params(args))}


@quart_app.get("/sse")
async def quart_sse() -> Any:
    args = quart.request.args
    return await quart_bridge.sse(args["p"], **params(args))


@quart_app.get("/offload")
async def quart_offload() -> Any:
    await quart_bridge.to_thread(time.sleep, 1.0, timeout=0.2)
    return {"slept": True}


@quart_app.get("/loop")
async def quart_loop() -> Any:
    return {"loops": count_loops()}


@quart_app.get("/retry")
async def quart_retry() -> Any:
    raise Overloaded("busy", retry_after=float(quart.request.args["after"]))


@quart_app.get("/hostile")
async def quart_hostile() -> Any:
    raise Hostile()


@quart_app.get("/conflict")
async def quart_conflict() -> Any:
    quart.abort(409)


@quart_app.get("/plain")
async def quart_plain() -> Any:
    return {"plain": True}


# Registered after the bridge: QuartBridge used to replace Quart's nested defaultdict of
# handlers with a plain dict, and this line raised KeyError at import.
@quart_app.errorhandler(409)
async def quart_conflict_handler(error: Exception) -> Any:
    return {"handled": "conflict"}, 409
