"""The OpenAI routes as a Flask blueprint (see :mod:`llmbridge.openai`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flask
from werkzeug.exceptions import HTTPException

from .._core.engine import Submitter
from .._exceptions import LLMBridgeError
from .._sansio.framing import Reply
from .._web.auth import PRINCIPAL_ENVIRON_KEY
from .._web.body import ASYNC_BODY_KEY, LoopBody
from .routes import METHODS, REQUEST_ID_HEADER, ROUTES, Call, Principal, Route, Routes

__all__ = ["flask_blueprint"]

request = flask.request


def _response(reply: Reply) -> flask.Response:
    return flask.Response(reply.body, status=reply.status, headers=reply.headers)


def _read_body(routes: Routes) -> bytes:
    reader = routes.reader(request.content_length)
    try:
        while chunk := request.stream.read(reader.wanted):
            reader.feed(chunk)
    except HTTPException as exc:  # the app's own MAX_CONTENT_LENGTH, a broken body
        raise reader.refused(exc) from None
    return reader.result()


def _handed(routes: Routes, call: Call, pump: Callable[[LoopBody], Any]) -> flask.Response:
    """The answer handed to the ASGI adapter, which awaits and pumps it on its loop:
    this thread goes back at once."""
    body: LoopBody = call.body() if call.streaming else call.whole()
    headers = routes.stream_headers(call) if call.streaming else routes.whole_headers(call)
    return flask.Response(
        pump(body), content_type=body.media_type, headers=headers, direct_passthrough=True
    )


def _authenticate(routes: Routes) -> flask.Response | None:
    """The blueprint's ``before_request``: a 401 unless the caller is known."""
    if not routes.needs_caller(request.endpoint, request.environ.get("SERVER_NAME")):
        return None
    try:
        answer = routes.authenticator()(request)
        if inspect.isawaitable(answer):
            close = getattr(answer, "close", None)
            if close is not None:
                close()
            raise TypeError("a Flask blueprint's authenticate hook must not be async")
        principal = routes.principal(answer)
    except Exception as error:  # a refusal (401), or a broken hook: a 500 that says nothing
        return _response(routes.failure(error))
    flask.g.llmbridge_principal = principal
    request.environ[PRINCIPAL_ENVIRON_KEY] = principal.id
    return None


def _principal() -> Principal | None:
    principal = flask.g.get("llmbridge_principal")
    return principal if isinstance(principal, Principal) else None


def _generate(routes: Routes, kind: str) -> flask.Response:
    principal = _principal()
    try:
        routes.admit_blocking(principal)
        call = routes.submit(
            kind,
            request.method,
            _read_body(routes),
            request.headers.get(REQUEST_ID_HEADER),
            principal,
            traceparent=request.headers.get("traceparent"),
        )
    except LLMBridgeError as error:
        return _response(routes.failure(error))
    pump = request.environ.get(ASYNC_BODY_KEY)
    if pump is not None:
        with call.closing_on_error():
            return _handed(routes, call, pump)
    if not call.streaming:
        return _response(routes.whole_reply_blocking(call))
    try:
        with call.closing_on_error():
            call.stream.wait_started(routes.start_timeout)
    except LLMBridgeError as error:
        return _response(routes.failure(error, call.stream.id))
    body = call.body()
    return flask.Response(body, content_type=body.media_type, headers=routes.stream_headers(call))


def _view(routes: Routes, route: Route) -> Callable[..., flask.Response]:
    if route.kind in ("chat", "completion"):
        return lambda: _generate(routes, route.kind)
    return lambda **args: _response(
        routes.answer(route.kind, request.method, request.path, args.get("model"))
    )


def flask_blueprint(
    submitter: Submitter, *, name: str = "llmbridge_openai", url_prefix: str = "/v1", **options: Any
) -> flask.Blueprint:
    """A Flask blueprint serving the OpenAI routes over ``submitter`` (an
    :class:`~llmbridge.Engine` or any :class:`~llmbridge.Submitter`); ``options`` are
    :class:`~llmbridge._openai.routes.Routes`'s (``auth``, required; ``open_models``,
    ``settings``, ``heartbeat``, ``start_timeout``, ``timeout``).

    Every route checks the caller first (``auth``): a missing or unknown key is a 401
    with ``WWW-Authenticate: Bearer``; the principal is ``flask.g.llmbridge_principal``
    and its id ``request.environ["llmbridge.principal"]``.

    Views run on the request's thread and block it until the answer is complete, or,
    streaming, until the first text is out (so an overload or an upstream error still
    gets its own status); under ``llmbridge.asgi`` a request holds its thread only until
    it is submitted: the adapter awaits the whole answer, or a stream's first output, and
    pumps it on its loop (and drains it on SIGTERM).
    Past ``start_timeout`` without output the answer is a 504. Every error is an
    OpenAI-shaped JSON body, unknown URLs under the prefix included.
    """
    routes = Routes(submitter, **options)
    bp = flask.Blueprint(name, __name__, url_prefix=url_prefix)
    bp.before_request(lambda: _authenticate(routes))
    for route in ROUTES:
        if route.kind != "not_found" or url_prefix.strip("/"):  # at the root: the app's 404
            bp.add_url_rule(route.rule, route.endpoint, _view(routes, route), methods=METHODS)
    return bp
