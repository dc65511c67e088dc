"""A Quart app with the bridge, served by hypercorn in tests.

Environment: ``QUART_TEST_DRAIN`` (drain timeout, 1 s), ``QUART_TEST_SHUTDOWN_FILE``
(the after_serving hook appends ``shutdown <pid>`` there).
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio.to_thread
from quart import Quart, jsonify, request

from llmbridge.quart import QuartBridge
from llmbridge.testing import simulated_engine

engine = simulated_engine(step_time=0.01, batch_exponent=0.0, max_batch_size=512)
app = Quart(__name__)
app.config["RESPONSE_TIMEOUT"] = 1  # streams must be exempt from it
bridge = QuartBridge(
    app, engine=engine, heartbeat=None, drain_timeout=float(os.environ.get("QUART_TEST_DRAIN", "1"))
)


@app.get("/sse")
async def sse():  # type: ignore[no-untyped-def]
    return await bridge.sse(request.args["prompt"], max_new_tokens=int(request.args.get("n", 16)))


@app.get("/stats")
async def stats():  # type: ignore[no-untyped-def]
    generator = engine.backend.generator
    return jsonify(
        pid=os.getpid(), cancelled=list(generator.cancelled), in_flight=generator.jobs_in_flight
    )


def _write_shutdown() -> None:
    path = os.environ.get("QUART_TEST_SHUTDOWN_FILE")
    if path:
        with Path(path).open("a") as file:
            file.write(f"shutdown {os.getpid()} engine_running={engine.running}\n")


@app.after_serving
async def write_shutdown() -> None:
    await anyio.to_thread.run_sync(_write_shutdown)
