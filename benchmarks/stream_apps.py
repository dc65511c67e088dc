"""The apps benchmarks/streams.py serves: one SSE endpoint, 20 tokens 50 ms apart.

``starlette_app`` is the reference (an async generator, no engine). The others stream
the same async generator through an llmbridge engine: ``quart_app`` (QuartBridge),
``flask_llmbridge`` (FlaskBridge under llmbridge.asgi), ``flask_a2wsgi`` and
``flask_asgiref`` (the same Flask app under a2wsgi and asgiref's WsgiToAsgi). Every
Flask app also serves the OpenAI blueprint (``POST /v1/chat/completions``), and
``starlette_app`` an OpenAI-shaped native twin of it, for the ``/v1`` rows.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

TOKENS = int(os.environ.get("BENCH_TOKENS", "20"))
GAP = float(os.environ.get("BENCH_GAP", "0.05"))
POOL = int(os.environ.get("BENCH_POOL", "8"))


async def tokens(prompt: str, **_: Any) -> AsyncIterator[str]:
    """The model: ``TOKENS`` tokens, ``GAP`` seconds apart."""
    for i in range(TOKENS):
        await asyncio.sleep(GAP)
        yield f" {prompt}-{i}"


def _engine() -> Any:
    from llmbridge import Engine
    from llmbridge.backends import CallableBackend

    return Engine(CallableBackend(tokens, max_concurrency=4096), max_queued=8192)


def __getattr__(name: str) -> Any:
    # Build only the app the server asked for (each server imports one).
    if name == "starlette_app":
        from starlette.applications import Starlette
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        async def sse(request: Any) -> StreamingResponse:
            async def events() -> AsyncIterator[bytes]:
                async for text in tokens(request.query_params["prompt"]):
                    yield f"data: {json.dumps({'text': text})}\n\n".encode()
                yield b"event: done\ndata: {}\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async def chat(request: Any) -> StreamingResponse:
            prompt = (await request.json())["messages"][-1]["content"]

            async def chunks() -> AsyncIterator[bytes]:
                async for text in tokens(prompt):
                    delta = {"choices": [{"index": 0, "delta": {"content": text}}]}
                    yield f"data: {json.dumps(delta)}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")

        return Starlette(
            routes=[Route("/sse", sse), Route("/v1/chat/completions", chat, methods=["POST"])]
        )
    if name == "quart_app":
        from quart import Quart, request

        from llmbridge.quart import QuartBridge

        app = Quart(__name__)
        bridge = QuartBridge(app, engine=_engine(), heartbeat=None)

        @app.get("/sse")
        async def quart_sse() -> Any:
            return await bridge.sse(request.args["prompt"])

        return app
    if name in ("flask_llmbridge", "flask_a2wsgi", "flask_asgiref"):
        from flask import Flask, request

        from llmbridge.flask import FlaskBridge
        from llmbridge.openai import flask_blueprint

        flask_app = Flask(__name__)
        engine = _engine()
        flask_bridge = FlaskBridge(flask_app, engine=engine, heartbeat=None)
        flask_app.register_blueprint(flask_blueprint(engine, auth=None))

        @flask_app.get("/sse")
        def flask_sse() -> Any:
            return flask_bridge.sse(request.args["prompt"])

        if name == "flask_llmbridge":
            from llmbridge.asgi import to_asgi

            return to_asgi(flask_app, workers=POOL)
        if name == "flask_a2wsgi":
            from a2wsgi import WSGIMiddleware

            return WSGIMiddleware(flask_app, workers=POOL)
        from asgiref.wsgi import WsgiToAsgi

        return WsgiToAsgi(flask_app)
    raise AttributeError(name)
