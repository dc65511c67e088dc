"""What the engine process and its clients agree on: paths, the environment variable,
and how an error crosses the socket.

The wire is the SSE framing every llmbridge integration already speaks
(:class:`~llmbridge._sansio.framing.SSEFramer`): ``data: {"text": ...}`` per chunk, a
final ``event: done`` with usage, or ``event: error`` with a problem object; an error
before the first chunk is a problem+json response. A problem names the error's class
(``"error": "Overloaded"``), so a client raises the same :class:`~llmbridge.LLMBridgeError`
leaf the engine raised, with the client-safe detail only: the backend's own text stays in
the engine process's log, under the request id.
"""

from __future__ import annotations

import json
from typing import Any

from .._exceptions import (
    BackendError,
    BadRequest,
    LLMBridgeError,
    UpstreamError,
    UpstreamRejected,
    _seconds,
)
from .._web.bridge import valid_request_id

__all__ = [
    "HEALTH_PATH",
    "SOCKET_ENV",
    "STATS_PATH",
    "SUBMIT_PATH",
    "error_from_problem",
    "parse_submit",
]

#: The environment variable naming the engine process's socket. Set: workers submit to
#: that process; unset: each process builds its own engine.
SOCKET_ENV = "LLMBRIDGE_ENGINE_SOCKET"

SUBMIT_PATH = "/llmbridge/v1/submit"
STATS_PATH = "/llmbridge/v1/stats"
HEALTH_PATH = "/llmbridge/v1/health"


def _tree(root: type[LLMBridgeError]) -> dict[str, type[LLMBridgeError]]:
    """The error tree of ``llmbridge._exceptions`` by class name, read from the classes
    themselves, so a new leaf crosses the socket without being listed here."""
    found = {root.__name__: root}
    for sub in root.__subclasses__():
        if sub.__module__ == root.__module__:
            found.update(_tree(sub))
    return found


_CLASSES = _tree(LLMBridgeError)


def parse_submit(raw: bytes) -> tuple[str, str | None, dict[str, Any]]:
    """A submit's ``(prompt, request_id, params)`` from its JSON body (both wires).
    Raises :class:`~llmbridge.BadRequest` naming what is wrong."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BadRequest("the submit body is not JSON") from exc
    if not isinstance(data, dict):
        raise BadRequest("the submit body must be a JSON object")
    prompt, request_id, params = data.get("prompt"), data.get("request_id"), data.get("params")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    if request_id is not None and valid_request_id(request_id) is None:
        raise BadRequest("request_id must be 1-128 characters of A-Za-z0-9._:-")
    if params is None:
        params = {}
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise BadRequest("params must be a JSON object")
    if "request_id" in params:
        raise BadRequest("request_id goes at the top level, not in params")
    return prompt, request_id, params


def error_from_problem(
    raw: str | bytes | dict[str, Any], status: int | None = None
) -> LLMBridgeError:
    """The :class:`~llmbridge.LLMBridgeError` a problem object from the engine process
    stands for: the same class (by name), its public detail, its ``retry_after``.

    A class this side doesn't know (a newer engine, an app's own subclass) becomes the
    nearest thing the status says: a :class:`~llmbridge.BackendError` for 5xx. Never
    raises.
    """
    data: Any = raw
    if not isinstance(raw, dict):
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
    if not isinstance(data, dict):
        return UpstreamError(
            "the engine process sent an answer that is not a problem object",
            upstream_status=status,
            summary="the engine process sent an invalid answer",
        )
    name = data.get("error")
    detail = data.get("detail")
    message = detail if isinstance(detail, str) else ""
    after = data.get("retry_after")
    retry_after = after if isinstance(after, (int, float)) and not isinstance(after, bool) else None
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    sent = data.get("status")
    if isinstance(sent, int) and not isinstance(sent, bool) and 400 <= sent <= 599:
        status = status or sent
    else:
        sent = None
    if cls is None:
        error: LLMBridgeError = BackendError(message)
    elif issubclass(cls, UpstreamRejected):
        fields = data.get("upstream_error")
        relayed: dict[str, str | None] = {
            key: value
            for key, value in (fields.items() if isinstance(fields, dict) else ())
            if key in ("message", "type", "param", "code") and isinstance(value, str)
        }
        error = UpstreamRejected(message, upstream_status=sent or 400, error_object=relayed)
    elif issubclass(cls, UpstreamError):
        error = UpstreamError(message, summary=message or None, upstream_status=status)
    else:
        try:
            error = cls(message)
        except TypeError:  # a leaf whose constructor wants more than a message
            error = BackendError(message)
    if sent is not None and cls is not None:
        error.status = sent  # the status the engine process chose (a 413 BadRequest, ...)
    if retry_after is not None or cls is None:
        error.retry_after = _seconds(retry_after)
    # The detail was already made client-safe by the engine process: show it as it is.
    if not error.public:
        error.public = True
    return error
