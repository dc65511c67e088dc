"""Errors as RFC 9457 problem objects, and the ``Retry-After`` header: no I/O.

Every integration answers an error with :func:`problem` and :func:`problem_headers`, so a
status, a detail and a ``Retry-After`` mean the same under Flask, Quart, the ASGI adapter
and the OpenAI routes. A detail reaches the client only when the error is ``public``; a
backend's own text goes to the log instead (see :attr:`LLMBridgeError.public`).
"""

from __future__ import annotations

import math
from typing import Any

from .._exceptions import MAX_RETRY_AFTER, LLMBridgeError, UpstreamRejected

__all__ = [
    "client_detail",
    "problem",
    "problem_headers",
    "problem_status",
    "retry_after_value",
]


def client_detail(error: BaseException, request_id: str | None = None) -> str:
    """What an HTTP client may read about ``error``: its message when it is ``public``,
    else a generic sentence naming the request id to look up in the server's log."""
    if isinstance(error, LLMBridgeError):
        if error.public:
            return error.message
        what = error.public_message
    else:
        what = "the request failed"
    if request_id:
        return f"{what}; the server log has the details under request id {request_id}"
    return what


def problem(error: BaseException, request_id: str | None = None) -> dict[str, Any]:
    """An RFC 9457 problem object for ``error`` (type, title, status, detail), with the
    request id when known. Never raises; reveals no backend text."""
    if isinstance(error, LLMBridgeError):
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": str(error.title),
            "status": problem_status(error),
            "detail": client_detail(error, request_id),
            "error": type(error).__name__,
        }
        after = _finite(error.retry_after)
        if after is not None:
            body["retry_after"] = after
        if isinstance(error, UpstreamRejected):
            # Written for the API client by the upstream (already capped): it crosses to
            # an engine process's clients, which relay it as it is.
            body["upstream_error"] = dict(error.error_object)
    else:
        body = {
            "type": "about:blank",
            "title": "Internal error",
            "status": 500,
            "detail": client_detail(error, request_id),
            "error": "InternalError",
        }
    if request_id:
        body["request_id"] = request_id
    return body


def problem_status(error: BaseException) -> int:
    """The HTTP status to answer ``error`` with: its ``status`` when that is an error
    status (400-599), else 500. Never raises."""
    status = getattr(error, "status", 500) if isinstance(error, LLMBridgeError) else 500
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        return 500
    return status


def _finite(after: object) -> float | None:
    # Seconds clamped to [0, MAX_RETRY_AFTER]; None for what is not a number at all.
    if after is None or isinstance(after, bool):
        return None
    try:
        seconds = float(after)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def retry_after_value(error: BaseException) -> str | None:
    """The ``Retry-After`` header value for ``error`` (whole seconds, rounded up), if any.
    Never raises: a value that is not a finite number is clamped or dropped."""
    seconds = _finite(getattr(error, "retry_after", None))
    return None if seconds is None else str(math.ceil(seconds))


def problem_headers(error: BaseException) -> dict[str, str]:
    """Headers of a problem response: its content type, and ``Retry-After`` when set."""
    headers = {"Content-Type": "application/problem+json"}
    after = retry_after_value(error)
    if after is not None:
        headers["Retry-After"] = after
    return headers
