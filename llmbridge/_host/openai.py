"""The OpenAI surface of the engine process: ``/v1/...`` over the same submitter, so an
OpenAI client (the SDK, :class:`~llmbridge.backends.OpenAIBackend`, curl) can reach the
engine process as it would reach vLLM. Workers use the leaner wire of :mod:`.wire`."""

from __future__ import annotations

from typing import Any

from .._core.engine import Submitter
from .._exceptions import LLMBridgeError
from .._openai.routes import REQUEST_ID_HEADER, Routes
from .pump import Receive, Scope, Send, header, read_body, reply, stream_reply

__all__ = ["OpenAISurface"]

_GENERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
_ID = REQUEST_ID_HEADER.lower().encode()


class OpenAISurface:
    """``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` as a plain ASGI app,
    answering with the same bytes as the Flask and Quart blueprints (one
    :class:`~llmbridge._openai.routes.Routes`). Thread-safe.

    No API keys (``auth=None``): the socket itself is the access control (mode 0600, or a
    group's 0660), and the workers in front of it check the keys of their clients.
    """

    def __init__(self, submitter: Submitter, **options: Any) -> None:
        self.routes = Routes(submitter, auth=None, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        routes = self.routes
        path: str = scope["path"]
        method: str = scope["method"]
        kind = _GENERATIONS.get(path)
        if kind is None:
            if path == "/v1/models":
                await reply(send, routes.answer("models", method, path))
            elif path.startswith("/v1/models/"):
                model = path.removeprefix("/v1/models/")
                await reply(send, routes.answer("model", method, path, model))
            else:
                await reply(send, routes.answer("not_found", method, path))
            return
        try:
            if method != "POST":
                routes.allow(method, "POST")
            call = routes.submit(kind, method, await read_body(receive), header(scope, _ID))
        except LLMBridgeError as error:
            await reply(send, routes.failure(error))
            return
        stream = call.stream
        if not call.streaming:
            try:
                with call.closing_on_error():
                    await stream.await_started(routes.start_timeout)
                    completion = await stream.aresult(routes.timeout)
            except LLMBridgeError as error:
                await reply(send, routes.failure(error, stream.id))
                return
            await reply(send, call.reply(completion))
            return
        await stream_reply(
            receive,
            send,
            stream,
            call.body(),
            routes.stream_headers(call),
            start_timeout=routes.start_timeout,
            on_error=lambda error: routes.failure(error, stream.id),
        )
