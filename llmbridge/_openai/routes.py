"""The OpenAI route table, once for every framework.

:class:`Routes` holds what the Flask and the Quart blueprints share: which URL does what,
how a request becomes a submitted :class:`Call`, and every answer as a framework-free
:class:`~llmbridge._sansio.framing.Reply` or a
:class:`~llmbridge._web.body.StreamBody`. The blueprints only read the body, wait (on a
thread or on the loop) and turn replies into their framework's responses, so both accept
the same requests and answer with the same bytes, and a stream takes the one path every
integration takes (the ASGI adapter's async body, the start timeout, the drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .._core.channel import Completion
from .._core.engine import Submitter
from .._core.stream import Stream
from .._exceptions import LLMBridgeError
from .._policies.budget import KeyLimits, Quotas
from .._policies.options import CallOptions
from .._policies.pipeline import Pipeline
from .._runtime.loop import spawn
from .._sansio.framing import Outcome, Reply
from .._web.auth import ApiKeys, Authenticate, Principal, as_principal, is_loopback
from .._web.body import StreamBody, WholeBody
from .._web.bridge import REQUEST_ID_HEADER, valid_request_id
from .._web.reqlog import RequestRecord
from .responses import (
    ROUTE_METHODS,
    SSE_HEADERS,
    OpenAIFramer,
    RelayFramer,
    error_reply,
    model_body,
    models_body,
    relay_reply,
    response_body,
)
from .wire import (
    InvalidRequest,
    ParsedRequest,
    Settings,
    decode_json,
    parse_chat,
    parse_completion,
)

__all__ = [
    "METHODS",
    "REQUEST_ID_HEADER",
    "ROUTES",
    "BodyReader",
    "Call",
    "LLMBridgeError",
    "MethodNotAllowed",
    "Principal",
    "Reply",
    "Route",
    "Routes",
    "Submitter",
    "Unauthorized",
    "too_large",
]

logger = logging.getLogger("llmbridge.openai")

_PARSERS: dict[str, Callable[..., ParsedRequest]] = {
    "chat": parse_chat,
    "completion": parse_completion,
}


@dataclass(frozen=True, slots=True)
class Route:
    """One URL rule (werkzeug syntax, under the blueprint's prefix) and what serves it:
    ``kind`` is ``"chat"`` / ``"completion"`` (a generation) or the name of a
    :class:`Routes` method answering at once."""

    rule: str
    endpoint: str
    kind: str


#: Every rule the blueprints register. The catch-alls answer unknown URLs under the
#: prefix with OpenAI's JSON 404 instead of the framework's HTML page.
ROUTES = (
    Route("/chat/completions", "chat_completions", "chat"),
    Route("/completions", "completions", "completion"),
    Route("/models", "models", "models"),
    Route("/models/<path:model>", "model", "model"),
    Route("", "root", "not_found"),
    Route("/", "root_slash", "not_found"),
    Route("/<path:rest>", "not_found", "not_found"),
)

METHODS = ROUTE_METHODS

#: The rule of each generation kind, as the log line's route.
_RULES = {route.kind: route.rule for route in ROUTES if route.kind in ("chat", "completion")}


class MethodNotAllowed(InvalidRequest):
    """A 405: ``allowed`` is the method the URL serves (sent as ``Allow``)."""

    def __init__(self, method: str, allowed: str) -> None:
        super().__init__(
            f"Method {method} is not allowed here; use {allowed}.",
            code="method_not_allowed",
            status=405,
        )
        self.allowed = allowed


class Unauthorized(InvalidRequest):
    """The 401 for a missing or unknown key: one message for both, so it never hints
    at which keys exist; ``challenge`` is sent as ``WWW-Authenticate``."""

    def __init__(self) -> None:
        super().__init__(
            "Missing or invalid API key: send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            status=401,
        )
        self.challenge = "Bearer"


#: ``auth=`` has no default: serving without keys must be said (``auth=None``).
_REQUIRED: Any = object()

#: Route kinds that ``open_models=True`` leaves open.
_MODEL_KINDS = ("models", "model")


def too_large(limit: int) -> InvalidRequest:
    """The 413 for a body over ``limit`` bytes."""
    return InvalidRequest(
        f"The request body is larger than this server accepts ({limit} bytes).",
        code="request_too_large",
        status=413,
    )


def report(error: BaseException, request_id: str | None) -> None:
    """Log an error a client gets only a generic line about, with its request id."""
    if isinstance(error, InvalidRequest):
        return
    if isinstance(error, LLMBridgeError) and error.public:
        logger.info("request %s: %s: %s", request_id, type(error).__name__, error.message)
    else:
        logger.error("request %s failed: %r", request_id, error, exc_info=error)


class BodyReader:
    """Collects one request body, refusing it (413) once it passes ``limit`` bytes, or
    before reading anything when its declared length already does. Not thread-safe."""

    def __init__(self, limit: int, declared: int | None) -> None:
        if declared is not None and declared > limit:
            raise too_large(limit)
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    @property
    def wanted(self) -> int:
        """How much to read next: enough to see the limit passed, at most 64 KiB."""
        return min(1 << 16, self.limit + 1 - self._size)

    def feed(self, chunk: bytes) -> None:
        """Add the next piece. Raises the 413 :class:`InvalidRequest` past the limit."""
        self._size += len(chunk)
        if self._size > self.limit:
            raise too_large(self.limit)
        self._chunks.append(chunk)

    def result(self) -> bytes:
        """The whole body."""
        return b"".join(self._chunks)

    @staticmethod
    def refused(exc: Any) -> InvalidRequest:
        """A framework's HTTP exception from reading the body (its own size limit, a
        body timeout) as the JSON error to answer."""
        code = getattr(exc, "code", None)
        return InvalidRequest(str(getattr(exc, "description", "")), status=code or 400)


@dataclass(eq=False)
class Call:
    """One submitted generation: what was asked, and its stream."""

    routes: Routes
    parsed: ParsedRequest
    stream: Stream
    principal: Principal | None = None
    #: The request's log line, written when the answer is complete.
    record: RequestRecord | None = None

    @property
    def streaming(self) -> bool:
        """Whether the client asked for SSE (``"stream": true``)."""
        return self.parsed.stream

    @contextlib.contextmanager
    def closing_on_error(self) -> Iterator[None]:
        """Cancel the request if the block raises (the view answers the error)."""
        try:
            yield
        except BaseException:
            self.stream.close()
            raise

    def reply(self, completion: Completion) -> Reply:
        """The whole answer of a non-streamed request."""
        headers = {REQUEST_ID_HEADER: self.stream.id}
        if self.parsed.relay:
            reply = relay_reply(completion.text, headers)
        else:
            reply = Reply.json(response_body(self.parsed, completion), headers=headers)
        if self.record is not None:
            self.record.finish(reply.status, self.stream.id)
        return reply

    def whole(self) -> WholeBody:
        """The non-streamed answer as a body a server can await on its loop."""
        routes = self.routes
        return WholeBody(
            self.stream,
            answer=lambda: routes.whole_reply(self),
            answer_blocking=lambda: routes.whole_reply_blocking(self),
        )

    def body(self) -> StreamBody:
        """The streamed answer: OpenAI chunks over the one :class:`StreamBody`."""
        request_id = self.stream.id
        kind = RelayFramer if self.parsed.relay else OpenAIFramer
        framer: Any = kind(
            self.parsed, request_id=request_id, report=lambda e: report(e, request_id)
        )
        if self.principal is not None and self.principal.limits is not None:
            framer = _Metered(framer, lambda tokens: self.routes.charge(self.principal, tokens))
        record = self.record
        if record is not None:
            record.status = 200
            record.deferred = True
        return StreamBody(
            self.stream,
            framer=framer,
            heartbeat=self.routes.heartbeat,
            start_timeout=self.routes.start_timeout,
            on_close=None if record is None else lambda: record.finish(None, request_id),
        )


def _backend_of(submitter: Any) -> Any:
    """The backend behind ``submitter``: an engine's own, or that of the engine a
    wrapper (a policy pipeline) names ``engine``; ``None`` when there is none to see."""
    for _ in range(4):
        backend = getattr(submitter, "backend", None)
        if backend is not None:
            return backend
        submitter = getattr(submitter, "engine", None)
        if submitter is None:
            return None
    return None


class _Metered:
    """An :class:`OpenAIFramer` that reports a finished stream's tokens (to charge the
    caller's budget); everything else is the framer's."""

    def __init__(self, framer: OpenAIFramer, on_end: Callable[[int], None]) -> None:
        self._framer = framer
        self._on_end = on_end
        self.media_type = framer.media_type
        self.heartbeats = framer.heartbeats
        self.head = framer.head
        self.text = framer.text
        self.heartbeat = framer.heartbeat
        self.error = framer.error
        self.error_response = framer.error_response

    def end(self, outcome: Outcome) -> bytes:
        self._on_end(outcome.total_tokens)
        return self._framer.end(outcome)


#: A route's endpoint name (as the blueprints register it) -> its kind.
_KIND_OF_ENDPOINT = {route.endpoint: route.kind for route in ROUTES}


class Routes:
    """The OpenAI surface over one submitter, independent of any framework.

    ``auth`` is required: an :class:`~llmbridge.openai.ApiKeys`, a hook
    ``authenticate(request) -> Principal | str | None`` (``async`` under Quart), or
    ``None`` to serve without keys (logged as a warning on the first request a
    non-loopback address serves); ``open_models=True`` leaves ``/models`` open.
    Other options: ``settings`` (:class:`Settings`), ``heartbeat`` (seconds of silence before
    an SSE comment; ``None``: never), ``start_timeout`` (seconds to wait for the first
    output before answering 504, streamed or not; ``None``: no limit), ``timeout``
    (a non-streamed answer's whole deadline after its first output; ``None``: none),
    ``passthrough`` (forward whole bodies and relay the upstream's answers; ``None``,
    the default: when the submitter's engine has a backend that declares
    ``passthrough = True``, such as :class:`~llmbridge.backends.OpenAIBackend`).
    Thread-safe: it holds no per-request state.
    """

    def __init__(
        self,
        submitter: Submitter,
        *,
        auth: ApiKeys | Authenticate | None = _REQUIRED,
        open_models: bool = False,
        settings: Settings | None = None,
        heartbeat: float | None = 15.0,
        start_timeout: float | None = 60.0,
        timeout: float | None = None,
        passthrough: bool | None = None,
    ) -> None:
        if auth is _REQUIRED:
            raise TypeError(
                "the OpenAI routes need auth=: ApiKeys([...]), ApiKeys.from_env(), "
                "ApiKeys.from_file(path), a hook authenticate(request) -> principal | None, "
                "or auth=None to serve without keys"
            )
        if auth is not None and not isinstance(auth, ApiKeys) and not callable(auth):
            # The type only: a key passed here by mistake must not reach a traceback.
            raise TypeError(f"auth must be ApiKeys, a callable or None, not {type(auth).__name__}")
        self.auth = auth
        self.open_models = bool(open_models)
        self._warned_open = False
        # A hook's principals with limits count in this process (ApiKeys has storage=).
        self.quotas = auth.quotas if isinstance(auth, ApiKeys) else Quotas()
        for name, value in (("start_timeout", start_timeout), ("timeout", timeout)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError(f"heartbeat must be > 0 or None, got {heartbeat!r}")
        self.submitter = submitter
        self.settings = settings or Settings()
        self.heartbeat = heartbeat
        self.start_timeout = start_timeout
        self.timeout = timeout
        if passthrough is None:
            passthrough = getattr(_backend_of(submitter), "passthrough", False) is True
        self.passthrough = passthrough
        # Submitted requests' log records by id, until their answer (weak: a Call that
        # is dropped without one takes its record with it).
        self._records: weakref.WeakValueDictionary[str, RequestRecord] = (
            weakref.WeakValueDictionary()
        )

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted (413 above it)."""
        return self.settings.max_body_bytes

    def reader(self, declared: int | None) -> BodyReader:
        """A :class:`BodyReader` for a body declaring ``declared`` bytes (or ``None``)."""
        return BodyReader(self.settings.max_body_bytes, declared)

    # -- who is calling ------------------------------------------------------------------

    def guards(self, kind: str) -> bool:
        """Whether a route of ``kind`` needs a principal."""
        return self.auth is not None and not (self.open_models and kind in _MODEL_KINDS)

    def needs_caller(self, endpoint: str | None, host: str | None) -> bool:
        """The first step of a blueprint's ``before_request``: whether the request to
        ``endpoint`` (the framework's ``request.endpoint``) must name its caller. Without
        keys it notes ``host`` (see :meth:`serving_at`) and answers False."""
        if self.auth is None:
            self.serving_at(host)
            return False
        kind = _KIND_OF_ENDPOINT.get((endpoint or "").rpartition(".")[2], "not_found")
        return self.guards(kind)

    def authenticator(self) -> Authenticate:
        """The check to run on the framework's request (only when :meth:`guards`)."""
        auth = self.auth
        assert auth is not None
        return auth.authenticate if isinstance(auth, ApiKeys) else auth

    @staticmethod
    def principal(answer: object) -> Principal:
        """An authenticator's answer as the caller's :class:`Principal`. Raises
        :class:`Unauthorized` (401) for ``None``, ``TypeError`` for a bad answer."""
        principal = as_principal(answer)
        if principal is None:
            raise Unauthorized()
        return principal

    def serving_at(self, host: str | None) -> None:
        """Note the address a request came in on: without keys on a non-loopback address
        this logs a warning, once."""
        if self.auth is None and not self._warned_open and not is_loopback(host):
            self._warned_open = True
            logger.warning(
                "the OpenAI routes are served on %s without API keys (auth=None): anyone "
                "who reaches this address can use the model",
                host,
            )

    # Every count runs on the process's background loop, whichever thread or loop
    # serves the request: a memory:// store is per loop, so one loop means one count
    # per process (and a Quart stream's end, charged from its body, lands there too).

    @staticmethod
    def _limited(principal: Principal | None) -> KeyLimits | None:
        if principal is None or principal.limits is None or not principal.limits.any:
            return None
        return principal.limits

    async def admit(self, principal: Principal | None) -> None:
        """Spend one request of ``principal``'s own limits; raises
        :class:`~llmbridge.RateLimited` (429) when one is reached. Any event loop."""
        limits = self._limited(principal)
        if principal is not None and limits is not None:
            await asyncio.wrap_future(spawn(self.quotas.acquire(principal.id, limits)))

    def admit_blocking(self, principal: Principal | None) -> None:
        """:meth:`admit` from a thread (blocks it on the background loop)."""
        limits = self._limited(principal)
        if principal is not None and limits is not None:
            spawn(self.quotas.acquire(principal.id, limits)).result(30)

    def charge(self, principal: Principal | None, tokens: int) -> None:
        """Add a finished stream's tokens to ``principal``'s budgets. Never blocks (the
        store is written on the background loop, a moment later) and never raises."""
        limits = self._limited(principal)
        if principal is not None and limits is not None:
            spawn(self.quotas.charge(principal.id, limits, tokens))

    async def acharge(self, principal: Principal | None, tokens: int) -> None:
        """Add a whole answer's tokens to ``principal``'s budgets before it is sent, so
        the next request sees them. Any event loop; never raises."""
        limits = self._limited(principal)
        if principal is not None and limits is not None:
            await asyncio.wrap_future(spawn(self.quotas.charge(principal.id, limits, tokens)))

    def charge_blocking(self, principal: Principal | None, tokens: int) -> None:
        """:meth:`acharge` from a thread (blocks it on the background loop)."""
        limits = self._limited(principal)
        if principal is not None and limits is not None:
            spawn(self.quotas.charge(principal.id, limits, tokens)).result(30)

    # -- generations ----------------------------------------------------------------------

    def submit(
        self,
        kind: str,
        method: str,
        raw: bytes,
        client_id: str | None = None,
        principal: Principal | None = None,
        *,
        traceparent: str | None = None,
    ) -> Call:
        """Validate a generation request and submit it. Never blocks. ``client_id`` is the
        client's ``X-Request-Id``: a valid one names the engine request. ``principal``
        is the caller: over a :class:`~llmbridge.policies.Pipeline` its id is the call's
        rate-limit key and cache namespace. ``traceparent`` (W3C) parents the request's
        span when tracing is on. Raises :class:`InvalidRequest` (400/405) or
        the submitter's admission error."""
        self.allow(method, "POST")
        parsed = _PARSERS[kind](decode_json(raw), self.settings, passthrough=self.passthrough)
        request_id = valid_request_id(client_id)
        named: dict[str, Any] = {} if request_id is None else {"request_id": request_id}
        if principal is not None and isinstance(self.submitter, Pipeline):
            named["policy"] = CallOptions(key=principal.id, namespace=principal.id)
        record = RequestRecord(
            method,
            _RULES.get(kind, kind),
            key_id=None if principal is None else principal.id,
            traceparent=traceparent,
        )
        stream = self.submitter.submit(parsed.prompt, **named, **parsed.params)
        record.stream = stream
        self._records[stream.id] = record
        return Call(self, parsed, stream, principal, record)

    async def whole_reply(self, call: Call) -> Reply:
        """A non-streamed request's whole answer, or its error's reply, once it is
        complete (the tokens charged first); ``start_timeout`` and ``timeout`` apply.
        Any event loop. Cancels the request if cancelled itself."""
        try:
            with call.closing_on_error():
                await call.stream.await_started(self.start_timeout)
                completion = await call.stream.aresult(self.timeout)
                await self.acharge(call.principal, completion.total_tokens)
                return call.reply(completion)
        except LLMBridgeError as error:
            return self.failure(error, call.stream.id)

    def whole_reply_blocking(self, call: Call) -> Reply:
        """:meth:`whole_reply` from a thread (blocks it)."""
        try:
            with call.closing_on_error():
                call.stream.wait_started(self.start_timeout)
                completion = call.stream.result(self.timeout)
                self.charge_blocking(call.principal, completion.total_tokens)
                return call.reply(completion)
        except LLMBridgeError as error:
            return self.failure(error, call.stream.id)

    def answer(self, kind: str, method: str, path: str, model: str | None = None) -> Reply:
        """The reply of a route that needs no generation (models, unknown URLs)."""
        try:
            if kind == "not_found":
                raise InvalidRequest(
                    f"Invalid URL ({method} {path}).", code="unknown_url", status=404
                )
            self.allow(method, "GET")
            if kind == "models":
                return Reply.json(models_body(self.settings))
            body = model_body(self.settings, model or "")
            if body is None:
                raise InvalidRequest(
                    f"The model '{model}' does not exist.",
                    param="model",
                    code="model_not_found",
                    status=404,
                )
            return Reply.json(body)
        except InvalidRequest as error:
            return self.failure(error)

    @staticmethod
    def allow(method: str, allowed: str) -> None:
        """Raise the 405 :class:`InvalidRequest` unless ``method`` is ``allowed``."""
        if method != allowed:
            raise MethodNotAllowed(method, allowed)

    def failure(self, error: BaseException, request_id: str | None = None) -> Reply:
        """The JSON reply for ``error`` (logged when the client can't read why), and the
        request's log line."""
        report(error, request_id)
        headers = {} if request_id is None else {REQUEST_ID_HEADER: request_id}
        allowed = getattr(error, "allowed", None)
        if allowed:
            headers["Allow"] = allowed
        challenge = getattr(error, "challenge", None)
        if challenge:
            headers["WWW-Authenticate"] = challenge
        reply = error_reply(error, request_id, headers)
        record = None if request_id is None else self._records.get(request_id)
        if record is None:
            record = RequestRecord(None, None)
        record.error = error
        record.finish(reply.status, request_id)
        return reply

    @staticmethod
    def stream_headers(call: Call) -> dict[str, str]:
        """Headers of a streamed answer."""
        return {**SSE_HEADERS, REQUEST_ID_HEADER: call.stream.id}

    @staticmethod
    def whole_headers(call: Call) -> dict[str, str]:
        """Headers of a whole answer, before it is known (the adapter sends its reply's)."""
        return {REQUEST_ID_HEADER: call.stream.id}
