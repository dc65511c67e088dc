"""The one exception tree of llmbridge.

Every error llmbridge raises on purpose derives from :class:`LLMBridgeError`. The leaves
are named for the state a caller can act on, and each carries the HTTP status the
integrations answer with (``status``) and, where waiting helps, a ``retry_after`` in
seconds::

    LLMBridgeError                 500
    ├── BadRequest                 400  the request itself is wrong: fix it, don't retry
    │   └── UpstreamRejected       4xx  an HTTP upstream refused the request: its own 4xx
    ├── Cancelled                  499  the consumer (or a deadline) cancelled the request
    ├── EngineClosed               503  the engine stopped admitting: it is shutting down
    ├── Overloaded                 503  the queue is full: retry after ``retry_after``
    │   └── CircuitOpen            503  the backend is failing: the breaker sheds calls
    ├── RateLimited                429  the caller's key is over its limit
    ├── SlowConsumer               503  the reader fell ``max_unread`` characters behind
    ├── Timeout                    504  a queue, first-token or total deadline passed
    └── BackendError               502  the backend failed this request
        ├── UpstreamError          502  an HTTP upstream failed (429 when it said 429)
        └── ConcurrentEntryError   500  two threads entered a single-owner object at once

``retryable`` tells the retry policy whether trying again may help. ``public`` tells the
integrations whether the message may be shown to an HTTP client: a backend's own text
(which can hold a database URL, a key, a file path) never is; it goes to the log.
"""

from __future__ import annotations

import math

__all__ = [
    "BackendError",
    "BadRequest",
    "Cancelled",
    "CircuitOpen",
    "ConcurrentEntryError",
    "EngineClosed",
    "LLMBridgeError",
    "OffloadError",
    "Overloaded",
    "RateLimited",
    "RemoteError",
    "SlowConsumer",
    "Timeout",
    "UpstreamError",
    "UpstreamRejected",
]


class LLMBridgeError(Exception):
    """Root of every error llmbridge raises on purpose.

    ``status`` is the HTTP status the integrations answer with, ``retry_after`` (seconds
    or ``None``) is sent as the ``Retry-After`` header, ``retryable`` says whether the
    retry policy may try the request again.
    """

    status: int = 500
    title: str = "LLM bridge error"
    retryable: bool = False
    #: Whether ``message`` may reach an HTTP client (False: a generic detail is sent).
    public: bool = True

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message or self.title)
        self.message = message or self.title
        self.retry_after = _seconds(retry_after)

    @property
    def public_message(self) -> str:
        """What an HTTP client may read: ``message`` if ``public``, else a generic line."""
        return self.message if self.public else "the backend failed"


#: The longest wait a ``retry_after`` may ask for (one day): an upstream's ``inf`` or
#: ``1e999`` becomes this rather than an overflow.
MAX_RETRY_AFTER = 86_400.0


def _seconds(value: float | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class BadRequest(LLMBridgeError):
    """The request is malformed or asks for something impossible; retrying won't help."""

    status = 400
    title = "Bad request"


#: The longest an upstream's error field may be when it is relayed to a client.
MAX_RELAYED_CHARS = 1_000


class UpstreamRejected(BadRequest):
    """An HTTP upstream refused the request itself: it answered a 4xx (not 401, 403 or
    429) whose body is an OpenAI error object, a message written for the API client.

    ``status`` and ``upstream_status`` are the upstream's status (400, 404, 409, 413,
    422, ...); ``error_object`` holds the error object's ``message``, ``type``, ``param``
    and ``code`` only (each a string of at most :data:`MAX_RELAYED_CHARS` characters, or
    ``None``); ``message`` is its message, and it is ``public``: the ``/v1`` routes relay
    the error object with the same status, the bridges put the message in the problem's
    ``detail``. It is not the upstream's failure: no failover, no breaker count, no retry.
    """

    title = "Rejected by the upstream"

    def __init__(
        self,
        message: str = "",
        *,
        upstream_status: int = 400,
        error_object: dict[str, str | None] | None = None,
    ) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status
        self.status = upstream_status if 400 <= upstream_status <= 499 else 400
        fields = dict(error_object or {})
        self.error_object: dict[str, str | None] = {
            "message": fields.get("message") or self.message,
            "type": fields.get("type"),
            "param": fields.get("param"),
            "code": fields.get("code"),
        }


class Cancelled(LLMBridgeError):
    """The request was cancelled before it finished: by its consumer or a deadline."""

    status = 499
    title = "Request cancelled"


class EngineClosed(LLMBridgeError):
    """The engine is closing or closed and admits no new requests."""

    status = 503
    title = "Engine closed"


class Overloaded(LLMBridgeError):
    """Admission refused: the engine's queue is full. Try again after ``retry_after``."""

    status = 503
    title = "Overloaded"
    retryable = True

    def __init__(self, message: str = "", *, retry_after: float | None = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class CircuitOpen(Overloaded):
    """The circuit breaker is open: the backend is failing, calls are shed until it heals."""

    title = "Circuit open"


class RateLimited(LLMBridgeError):
    """The caller's key is over its rate limit; ``retry_after`` says when it frees up."""

    status = 429
    title = "Rate limited"

    def __init__(self, message: str = "", *, retry_after: float | None = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class SlowConsumer(LLMBridgeError):
    """The consumer read so slowly that ``max_unread`` characters of its output waited,
    and the backend could not pause this request: it was ended to bound the memory one
    stream may hold. Raised at the reader's next read, after the text it had not read."""

    status = 503
    title = "Slow consumer"


class Timeout(LLMBridgeError):
    """A deadline passed: waiting in the queue, for the first token, or in total."""

    status = 504
    title = "Timed out"


class BackendError(LLMBridgeError):
    """The backend failed this request. The original exception is the ``__cause__``."""

    status = 502
    title = "Backend error"
    public = False


class UpstreamError(BackendError):
    """An HTTP upstream answered with an error status or broke the connection.

    ``upstream_status`` is the upstream's status code (``None`` when the connection broke).
    429 and 5xx answers are ``retryable``. A 429 keeps its ``status`` (429, not 502): the
    client is told to slow down, with the upstream's ``retry_after``. ``summary`` is the
    client-safe part of ``message`` (our words, without the upstream's text).
    """

    title = "Upstream error"

    def __init__(
        self,
        message: str = "",
        *,
        upstream_status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        summary: str | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.upstream_status = upstream_status
        if upstream_status == 429:
            self.status = 429
        self.retryable = retryable
        self.summary = summary

    @property
    def public_message(self) -> str:
        """``summary``, or the upstream's status: never its body, which may echo secrets."""
        if self.summary:
            return self.summary
        if self.upstream_status is None:
            return "the upstream failed"
        return f"the upstream answered {self.upstream_status}"


class ConcurrentEntryError(BackendError):
    """Two threads entered an object that must only ever be driven by one.

    :class:`llmbridge.testing.SimulatedGenerator` raises it, so tests prove the
    single-owner invariant instead of hoping for it.
    """

    status = 500
    title = "Concurrent entry"


class OffloadError(LLMBridgeError):
    """An offloaded call failed in the offload machinery itself: its worker process
    died, the pool broke, or its arguments or result couldn't cross the process
    boundary. Answered 500; the message goes to the log only."""

    status = 500
    title = "Offload failed"
    public = False


class RemoteError(OffloadError):
    """An exception raised in a worker process that couldn't be sent back as itself
    (its class or attributes don't pickle).

    ``type_name`` is the original's qualified type name (``"mymodule.ApiError"``),
    ``remote_message`` its ``str()``, ``remote_traceback`` the formatted traceback from
    the worker. Answered 500, like any :class:`OffloadError`.
    """

    def __init__(self, type_name: str, remote_message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {remote_message}")
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
