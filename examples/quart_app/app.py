"""The Flask example app's streaming endpoints, in Quart with QuartBridge.

    hypercorn examples.quart_app:app --bind 127.0.0.1:8000
    gunicorn -c examples/gunicorn.conf.py examples.quart_app:app

Apart from ``async``/``await`` the views read like the Flask ones.
"""

from __future__ import annotations

import os
from typing import Any

from quart import Quart, request

from llmbridge import BadRequest
from llmbridge.quart import QuartBridge
from llmbridge.testing import simulated_engine

app = Quart(__name__)
bridge = QuartBridge(
    app,
    engine=simulated_engine(step_time=0.02, max_new_tokens=32),
    drain_timeout=float(os.environ.get("LLMBRIDGE_DRAIN_TIMEOUT", "10")),
)


async def prompt_of() -> tuple[str, dict[str, Any]]:
    body = await request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest('send a JSON object like {"prompt": "..."}')
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string")
    params: dict[str, Any] = {}
    if "max_tokens" in body:
        params["max_new_tokens"] = body["max_tokens"]
    return prompt, params


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"ok": True, "admitting": bridge.drain.admitting}


@app.post("/complete")
async def complete() -> dict[str, Any]:
    prompt, params = await prompt_of()
    return {"text": await bridge.generate(prompt, **params)}


@app.post("/stream")
async def stream() -> Any:
    prompt, params = await prompt_of()
    return await bridge.sse(prompt, **params)


@app.get("/tokens")
async def tokens() -> dict[str, Any]:
    prompt = request.args.get("prompt", "hello")
    return {"chunks": [chunk async for chunk in bridge.stream(prompt)]}
