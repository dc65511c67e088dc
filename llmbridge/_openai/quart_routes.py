"""The OpenAI routes as a Quart blueprint (see :mod:`llmbridge.openai`).

Streams are pumped through the one :class:`~llmbridge._web.body.StreamBody` and counted
by a :class:`~llmbridge._web.drain.Drain`: the app's :class:`~llmbridge.quart.QuartBridge`
one when it has a bridge, else the blueprint's own, which listens for SIGTERM/SIGINT
while the app serves. On shutdown new requests get a 503 and open streams run up to
``drain_timeout``, then end with a final error event and a clean end of the body.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from quart import Blueprint, Quart, Response, current_app, g, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from .._web.auth import PRINCIPAL_ENVIRON_KEY
from .._web.body import StreamBody
from .._web.drain import Drain, find_engines
from .routes import (
    METHODS,
    REQUEST_ID_HEADER,
    ROUTES,
    Call,
    LLMBridgeError,
    Principal,
    Reply,
    Route,
    Routes,
    Submitter,
)

__all__ = ["quart_blueprint"]


def _response(reply: Reply) -> Response:
    return Response(reply.body, status=reply.status, headers=Headers(reply.headers))


async def _read_body(routes: Routes) -> bytes:
    reader = routes.reader(request.content_length)
    try:
        async for chunk in request.body:
            reader.feed(chunk)
    except HTTPException as exc:  # the app's own MAX_CONTENT_LENGTH, a body timeout
        raise reader.refused(exc) from None
    return reader.result()


class _Drains:
    """Which :class:`Drain` counts this blueprint's streams, per app."""

    def __init__(self, submitter: Submitter, options: dict[str, Any]) -> None:
        self._submitter = submitter
        self._options = options
        self._own: weakref.WeakKeyDictionary[Quart, Drain] = weakref.WeakKeyDictionary()

    def of(self, app: Quart) -> Drain | None:
        """The app's bridge's drain, else ours (``None`` before the app serves)."""
        try:
            drain = getattr(app.extensions.get("llmbridge"), "drain", None)
        except RuntimeError:  # a bridge that can't tell its app apart here
            drain = None
        return drain if isinstance(drain, Drain) else self._own.get(app)

    async def serving(self) -> None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        if self.of(app) is not None:
            return  # a QuartBridge drains the app: it counts our streams too
        drain = Drain(
            timeout=self._options["drain_timeout"], retry_after=self._options["retry_after"]
        )
        drain.bind(asyncio.get_running_loop(), lambda: find_engines(self._submitter))
        if self._options["handle_signals"]:
            drain.install_signal_handlers()
        self._own[app] = drain

    async def stopping(self) -> None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        drain = self._own.pop(app, None)
        if drain is not None:
            try:
                await drain.run()
            finally:
                drain.restore_signal_handlers()


async def _unmanaged(body: StreamBody) -> AsyncIterator[bytes]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        body.close()  # Quart closes the body when the client leaves: stop the generation


async def _authenticate(routes: Routes) -> Response | None:
    """The blueprint's ``before_request``: a 401 unless the caller is known."""
    server = request.scope.get("server")
    if not routes.needs_caller(request.endpoint, str(server[0]) if server else None):
        return None
    try:
        answer = routes.authenticator()(request)
        if inspect.isawaitable(answer):
            answer = await answer
        principal = routes.principal(answer)
    except Exception as error:  # a refusal (401), or a broken hook: a 500 that says nothing
        return _response(routes.failure(error))
    g.llmbridge_principal = principal
    request.scope[PRINCIPAL_ENVIRON_KEY] = principal.id  # type: ignore[literal-required]
    return None


async def _generate(routes: Routes, drains: _Drains, kind: str) -> Response:
    principal = g.get("llmbridge_principal")
    if not isinstance(principal, Principal):
        principal = None
    try:
        await routes.admit(principal)
        call = routes.submit(
            kind,
            request.method,
            await _read_body(routes),
            request.headers.get(REQUEST_ID_HEADER),
            principal,
            traceparent=request.headers.get("traceparent"),
        )
    except LLMBridgeError as error:
        return _response(routes.failure(error))
    return await _answer(routes, drains, call)


async def _answer(routes: Routes, drains: _Drains, call: Call) -> Response:
    if not call.streaming:
        return _response(await routes.whole_reply(call))
    body = call.body()
    with call.closing_on_error():  # a client that leaves meanwhile cancels it
        reply = await body.opening()
    if reply is not None:  # it failed before its first text: say so with its own status
        return _response(reply)
    drain = drains.of(current_app._get_current_object())  # type: ignore[attr-defined]
    response = Response(
        _unmanaged(body) if drain is None else drain.pump(body),
        content_type=body.media_type,
        headers=routes.stream_headers(call),
    )
    response.timeout = None  # a token stream lasts as long as the generation
    return response


def _view(routes: Routes, drains: _Drains, route: Route) -> Callable[..., Awaitable[Response]]:
    if route.kind in ("chat", "completion"):

        async def generate() -> Response:
            return await _generate(routes, drains, route.kind)

        return generate

    async def answer(**args: Any) -> Response:
        model = args.get("model")
        return _response(routes.answer(route.kind, request.method, request.path, model))

    return answer


def quart_blueprint(
    submitter: Submitter,
    *,
    name: str = "llmbridge_openai",
    url_prefix: str = "/v1",
    drain_timeout: float = 10.0,
    retry_after: float = 5.0,
    handle_signals: bool = True,
    **options: Any,
) -> Blueprint:
    """A Quart blueprint serving the OpenAI routes over ``submitter``; ``options`` are
    :class:`~llmbridge._openai.routes.Routes`'s (``auth``, required; ``open_models``,
    ``settings``, ``heartbeat``, ``start_timeout``, ``timeout``).

    Every route checks the caller first (``auth``; the hook may be ``async``): a
    missing or unknown key is a 401 with ``WWW-Authenticate: Bearer``; the principal is
    ``quart.g.llmbridge_principal`` and its id ``request.scope["llmbridge.principal"]``.
    Views never block the event loop: they await the engine. An answer starts only once
    the first text is out (504 past ``start_timeout``), so an overload or an upstream
    error still gets its own status; a client that disconnects cancels its request. On
    SIGTERM streams are drained (see the module docstring): ``drain_timeout``,
    ``retry_after`` and ``handle_signals`` as for :class:`~llmbridge.quart.QuartBridge`.
    Every error is an OpenAI-shaped JSON body, unknown URLs under the prefix included.
    """
    routes = Routes(submitter, **options)
    drains = _Drains(
        submitter,
        {
            "drain_timeout": drain_timeout,
            "retry_after": retry_after,
            "handle_signals": handle_signals,
        },
    )
    Drain(timeout=drain_timeout, retry_after=retry_after)  # check the values now
    bp = Blueprint(name, __name__, url_prefix=url_prefix)
    bp.before_app_serving(drains.serving)
    bp.after_app_serving(drains.stopping)

    @bp.before_request
    async def admit() -> Response | None:
        drain = drains.of(current_app._get_current_object())  # type: ignore[attr-defined]
        if drain is not None and not drain.admitting:
            return _response(routes.failure(drain.refusal()))
        return await _authenticate(routes)

    for route in ROUTES:
        if route.kind == "not_found" and not url_prefix.strip("/"):
            continue  # at the root, the app's own 404s stay the app's
        view = _view(routes, drains, route)
        bp.add_url_rule(route.rule, route.endpoint, view, methods=METHODS)
    return bp
