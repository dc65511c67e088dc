"""The OpenAI-compatible surface as a Quart blueprint (see :mod:`llmbridge.openai`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

try:
    from quart import Blueprint, Response, request
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'llmbridge.openai.quart_blueprint needs Quart: pip install "llmbridge[quart]"'
    ) from exc

from .._core.engine import Submitter
from .._core.stream import Stream
from .._exceptions import LLMBridgeError
from .._sansio.sse import encode_comment
from .wire import (
    ROUTE_METHODS,
    SSE_HEADERS,
    ChunkShaper,
    InvalidRequest,
    ParsedRequest,
    Settings,
    decode_json,
    error_body,
    method_not_allowed_body,
    model_body,
    models_body,
    parse_chat,
    parse_completion,
    response_body,
    retry_after_header,
)

__all__ = ["quart_blueprint"]

_METHODS = ROUTE_METHODS
_SSE_HEADERS = SSE_HEADERS


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False),
        status=status,
        mimetype="application/json",
        headers=headers,
    )


def _error(error: BaseException) -> Response:
    status, body = error_body(error)
    return _json(body, status, retry_after_header(error))


def _not_allowed(allowed: str) -> Response:
    return _json(method_not_allowed_body(request.method, allowed), 405, {"Allow": allowed})


async def _events(
    stream: Stream, parsed: ParsedRequest, heartbeat: float | None
) -> AsyncIterator[bytes]:
    shaper = ChunkShaper(parsed)
    channel = stream.channel
    try:
        head = shaper.start()
        if head:
            yield head
        while True:
            try:
                text = await channel.anext_text(heartbeat)
            except StopAsyncIteration:
                yield shaper.end(channel.completion())
                return
            except LLMBridgeError as error:
                yield shaper.error(error)
                return
            yield encode_comment() if text is None else shaper.text(text)
    finally:
        # Quart closes the body when the client leaves: stop the generation.
        await stream.aclose()


def quart_blueprint(
    submitter: Submitter,
    *,
    settings: Settings | None = None,
    name: str = "llmbridge_openai",
    url_prefix: str = "/v1",
    heartbeat: float | None = 15.0,
) -> Blueprint:
    """A Quart blueprint serving ``/v1/chat/completions``, ``/v1/completions`` and
    ``/v1/models`` over ``submitter`` (an :class:`~llmbridge.Engine` or any
    :class:`~llmbridge.Submitter`).

    Views never block the event loop: they await the engine. A streamed answer starts
    only once the first text is out, so an overload or an upstream error still gets its
    own status; a client that disconnects cancels its request. Every error is an
    OpenAI-shaped JSON body.
    """
    settings = settings or Settings()
    bp = Blueprint(name, __name__, url_prefix=url_prefix)

    async def complete(parse: Callable[[Any, Settings], ParsedRequest]) -> Response:
        if request.method != "POST":
            return _not_allowed("POST")
        try:
            parsed = parse(decode_json(await request.get_data(as_text=False)), settings)
            stream = submitter.submit(parsed.prompt, **parsed.params)
        except LLMBridgeError as error:
            return _error(error)
        try:
            if not parsed.stream:
                return _json(response_body(parsed, await stream.aresult()))
            await stream.await_started()
        except LLMBridgeError as error:
            await stream.aclose()
            return _error(error)
        except BaseException:
            await stream.aclose()
            raise
        response = Response(
            _events(stream, parsed, heartbeat),
            mimetype="text/event-stream",
            headers=_SSE_HEADERS,
        )
        response.timeout = None  # a token stream lasts as long as the generation
        return response

    @bp.route("/chat/completions", methods=_METHODS)
    async def chat_completions() -> Response:
        return await complete(parse_chat)

    @bp.route("/completions", methods=_METHODS)
    async def completions() -> Response:
        return await complete(parse_completion)

    @bp.route("/models", methods=_METHODS)
    async def models() -> Response:
        if request.method != "GET":
            return _not_allowed("GET")
        return _json(models_body(settings))

    @bp.route("/models/<path:model>", methods=_METHODS)
    async def model(model: str) -> Response:
        if request.method != "GET":
            return _not_allowed("GET")
        body = model_body(settings, model)
        if body is None:
            error = InvalidRequest(
                f"The model '{model}' does not exist.", param="model", code="model_not_found"
            )
            _, payload = error_body(error)
            return _json(payload, 404)
        return _json(body)

    return bp
