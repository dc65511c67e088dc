"""The OpenAI routes as a Flask blueprint (see :mod:`llmbridge.openai`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from flask import Blueprint, Response, request
    from werkzeug.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'llmbridge.openai.flask_blueprint needs Flask: pip install "llmbridge[flask]"'
    ) from exc

from .._core.engine import Submitter
from .._exceptions import LLMBridgeError
from .._sansio.framing import Reply
from .._web.body import ASYNC_BODY_KEY
from .routes import METHODS, ROUTES, Call, Route, Routes, too_large
from .wire import InvalidRequest, Settings

__all__ = ["flask_blueprint"]


def _response(reply: Reply) -> Response:
    return Response(reply.body, status=reply.status, headers=reply.headers)


def _read_body(limit: int) -> bytes:
    """The request body, read in pieces; 413 once it passes ``limit`` bytes (a declared
    Content-Length over it is refused before reading anything)."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        stream = request.stream
        chunks: list[bytes] = []
        size = 0
        while chunk := stream.read(min(1 << 16, limit + 1 - size)):
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except HTTPException as exc:  # the app's own MAX_CONTENT_LENGTH, a broken body
        raise InvalidRequest(str(exc.description), status=exc.code or 400) from None
    return b"".join(chunks)


def _stream(routes: Routes, call: Call) -> Response:
    body = call.body()
    headers = routes.stream_headers(call)
    pump = request.environ.get(ASYNC_BODY_KEY)
    if pump is not None:
        # The ASGI adapter pumps the body on its loop: this thread goes back at once.
        return Response(
            pump(body), content_type=body.media_type, headers=headers, direct_passthrough=True
        )
    return Response(body, content_type=body.media_type, headers=headers)


def _generate(routes: Routes, kind: str) -> Response:
    try:
        call = routes.submit(kind, request.method, _read_body(routes.max_body_bytes))
    except LLMBridgeError as error:
        return _response(routes.failure(error))
    try:
        with call.closing_on_error():
            if call.streaming and ASYNC_BODY_KEY in request.environ:
                return _stream(routes, call)  # the adapter awaits the first output itself
            call.stream.wait_started(routes.start_timeout)
            if call.streaming:
                return _stream(routes, call)
            return _response(call.reply(call.stream.result(routes.timeout)))
    except LLMBridgeError as error:
        return _response(routes.failure(error, call.stream.id))


def _view(routes: Routes, route: Route) -> Callable[..., Response]:
    if route.kind in ("chat", "completion"):
        return lambda: _generate(routes, route.kind)

    def answer(**args: Any) -> Response:
        model = args.get("model")
        return _response(routes.answer(route.kind, request.method, request.path, model))

    return answer


def flask_blueprint(
    submitter: Submitter,
    *,
    settings: Settings | None = None,
    name: str = "llmbridge_openai",
    url_prefix: str = "/v1",
    heartbeat: float | None = 15.0,
    start_timeout: float | None = 60.0,
    timeout: float | None = None,
) -> Blueprint:
    """A Flask blueprint serving the OpenAI routes (:data:`~llmbridge._openai.routes.ROUTES`)
    over ``submitter`` (an :class:`~llmbridge.Engine` or any :class:`~llmbridge.Submitter`).

    Views run on the request's thread and block it until the answer is complete, or,
    streaming, until the first text is out (so an overload or an upstream error still
    gets its own status); under ``llmbridge.asgi`` a stream holds no thread at all: the
    adapter awaits its first output and pumps it on its loop (and drains it on SIGTERM).
    Past ``start_timeout`` without output the answer is a 504. Every error is an
    OpenAI-shaped JSON body, unknown URLs under the prefix included.
    """
    routes = Routes(
        submitter,
        settings=settings,
        heartbeat=heartbeat,
        start_timeout=start_timeout,
        timeout=timeout,
    )
    bp = Blueprint(name, __name__, url_prefix=url_prefix)
    for route in ROUTES:
        if route.kind == "not_found" and not url_prefix.strip("/"):
            continue  # at the root, the app's own 404s stay the app's
        bp.add_url_rule(route.rule, route.endpoint, _view(routes, route), methods=METHODS)
    return bp
