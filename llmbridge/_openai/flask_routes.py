"""The OpenAI-compatible surface as a Flask blueprint (see :mod:`llmbridge.openai`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

try:
    from flask import Blueprint, Response, request
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'llmbridge.openai.flask_blueprint needs Flask: pip install "llmbridge[flask]"'
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

__all__ = ["flask_blueprint"]

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


def _events(stream: Stream, parsed: ParsedRequest, heartbeat: float | None) -> Iterator[bytes]:
    shaper = ChunkShaper(parsed)
    channel = stream.channel
    try:
        head = shaper.start()
        if head:
            yield head
        while True:
            try:
                text = channel.next_text(heartbeat)
            except StopIteration:
                yield shaper.end(channel.completion())
                return
            except LLMBridgeError as error:
                yield shaper.error(error)
                return
            yield encode_comment() if text is None else shaper.text(text)
    finally:
        # The server closes the body when the client leaves: stop the generation.
        stream.close()


def flask_blueprint(
    submitter: Submitter,
    *,
    settings: Settings | None = None,
    name: str = "llmbridge_openai",
    url_prefix: str = "/v1",
    heartbeat: float | None = 15.0,
) -> Blueprint:
    """A Flask blueprint serving ``/v1/chat/completions``, ``/v1/completions`` and
    ``/v1/models`` over ``submitter`` (an :class:`~llmbridge.Engine` or any
    :class:`~llmbridge.Submitter`).

    Views run on the request's thread and block it until the answer is complete (or,
    streaming, until the first text is out, so an overload or an upstream error still gets
    its own status instead of a broken 200). Every error is an OpenAI-shaped JSON body.
    """
    settings = settings or Settings()
    bp = Blueprint(name, __name__, url_prefix=url_prefix)

    def complete(parse: Callable[[Any, Settings], ParsedRequest]) -> Response:
        if request.method != "POST":
            return _not_allowed("POST")
        try:
            parsed = parse(decode_json(request.get_data()), settings)
            stream = submitter.submit(parsed.prompt, **parsed.params)
        except LLMBridgeError as error:
            return _error(error)
        try:
            if not parsed.stream:
                return _json(response_body(parsed, stream.result()))
            stream.wait_started()
        except LLMBridgeError as error:
            stream.close()
            return _error(error)
        except BaseException:
            stream.close()
            raise
        return Response(
            _events(stream, parsed, heartbeat),
            mimetype="text/event-stream",
            headers=_SSE_HEADERS,
        )

    @bp.route("/chat/completions", methods=_METHODS)
    def chat_completions() -> Response:
        return complete(parse_chat)

    @bp.route("/completions", methods=_METHODS)
    def completions() -> Response:
        return complete(parse_completion)

    @bp.route("/models", methods=_METHODS)
    def models() -> Response:
        if request.method != "GET":
            return _not_allowed("GET")
        return _json(models_body(settings))

    @bp.route("/models/<path:model>", methods=_METHODS)
    def model(model: str) -> Response:
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
