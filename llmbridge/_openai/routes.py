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
from .._sansio.framing import Reply
from .._web.body import StreamBody
from .._web.bridge import REQUEST_ID_HEADER, valid_request_id
from .._web.reqlog import RequestRecord
from .responses import (
    ROUTE_METHODS,
    SSE_HEADERS,
    OpenAIFramer,
    error_reply,
    model_body,
    models_body,
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
    "Reply",
    "Route",
    "Routes",
    "Submitter",
    "too_large",
]

logger = logging.getLogger("llmbridge.openai")

_PARSERS: dict[str, Callable[[Any, Settings], ParsedRequest]] = {
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
        reply = Reply.json(response_body(self.parsed, completion), headers=headers)
        if self.record is not None:
            self.record.finish(reply.status, self.stream.id)
        return reply

    def body(self) -> StreamBody:
        """The streamed answer: OpenAI chunks over the one :class:`StreamBody`."""
        request_id = self.stream.id
        framer = OpenAIFramer(
            self.parsed, request_id=request_id, report=lambda e: report(e, request_id)
        )
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


class Routes:
    """The OpenAI surface over one submitter, independent of any framework.

    Options: ``settings`` (:class:`Settings`), ``heartbeat`` (seconds of silence before
    an SSE comment; ``None``: never), ``start_timeout`` (seconds to wait for the first
    output before answering 504, streamed or not; ``None``: no limit), ``timeout``
    (a non-streamed answer's whole deadline after its first output; ``None``: none).
    Thread-safe: it holds no per-request state.
    """

    def __init__(
        self,
        submitter: Submitter,
        *,
        settings: Settings | None = None,
        heartbeat: float | None = 15.0,
        start_timeout: float | None = 60.0,
        timeout: float | None = None,
    ) -> None:
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

    def submit(self, kind: str, method: str, raw: bytes, client_id: str | None = None) -> Call:
        """Validate a generation request and submit it. Never blocks. ``client_id`` is the
        client's ``X-Request-Id``: a valid one names the engine request. Raises
        :class:`InvalidRequest` (400/405) or the submitter's admission error."""
        self.allow(method, "POST")
        parsed = _PARSERS[kind](decode_json(raw), self.settings)
        request_id = valid_request_id(client_id)
        named = {} if request_id is None else {"request_id": request_id}
        record = RequestRecord(method, _RULES.get(kind, kind))
        stream = self.submitter.submit(parsed.prompt, **named, **parsed.params)
        record.stream = stream
        self._records[stream.id] = record
        return Call(self, parsed, stream, record)

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
