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

from .._exceptions import BackendError, LLMBridgeError, UpstreamError, _seconds

__all__ = [
    "HEALTH_PATH",
    "SOCKET_ENV",
    "STATS_PATH",
    "SUBMIT_PATH",
    "error_from_problem",
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


def error_from_problem(raw: str | bytes, status: int | None = None) -> LLMBridgeError:
    """The :class:`~llmbridge.LLMBridgeError` a problem object from the engine process
    stands for: the same class (by name), its public detail, its ``retry_after``.

    A class this side doesn't know (a newer engine, an app's own subclass) becomes the
    nearest thing the status says: a :class:`~llmbridge.BackendError` for 5xx. Never
    raises.
    """
    try:
        data: Any = json.loads(raw)
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
    if cls is None:
        error: LLMBridgeError = BackendError(message)
    elif issubclass(cls, UpstreamError):
        error = UpstreamError(message, summary=message or None, upstream_status=status)
    else:
        try:
            error = cls(message)
        except TypeError:  # a leaf whose constructor wants more than a message
            error = BackendError(message)
    if retry_after is not None or cls is None:
        error.retry_after = _seconds(retry_after)
    # The detail was already made client-safe by the engine process: show it as it is.
    if not error.public:
        error.public = True
    return error
