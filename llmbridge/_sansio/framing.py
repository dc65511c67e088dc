"""How a streamed answer becomes bytes, without I/O: the :class:`Framer` protocol.

One :class:`~llmbridge._web.body.StreamBody` drives every streamed response (Flask,
Quart, the ASGI adapter, the OpenAI routes); a framer decides what its bytes look like:

- :class:`SSEFramer`: ``data: {"text": ...}`` events, heartbeat comments, a final
  ``event: done`` (finish reason and usage) or ``event: error`` (a problem object);
- :class:`TextFramer`: the raw UTF-8 text; an error can't be framed, so the body raises
  and the server drops the connection;
- the OpenAI chunk framer in :mod:`llmbridge._openai.responses`.

A framer also renders the whole error response for a failure that happens before the
first byte (:meth:`Framer.error_response`), so a server that waits for the first output
itself (the ASGI adapter) answers in the framer's shape: problem+json, or OpenAI's
``{"error": ...}`` under ``/v1``. Framers hold no locks: one per response.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .problem import problem, problem_headers
from .sse import dumps, encode_chunk, encode_comment, encode_done, encode_error

__all__ = ["Framer", "Outcome", "Reply", "SSEFramer", "TextFramer", "dumps", "problem_reply"]


class Outcome(Protocol):
    """What a finished stream reports (:class:`~llmbridge.Completion` is one)."""

    @property
    def id(self) -> str: ...

    @property
    def finish_reason(self) -> str: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def total_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole response, ready to send: status, headers and body bytes."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(
        cls,
        value: Any,
        status: int = 200,
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """A JSON reply (UTF-8; a lone surrogate is escaped, never an error)."""
        pairs = [("Content-Type", content_type)]
        pairs += [(k, v) for k, v in (headers or {}).items() if k.lower() != "content-type"]
        return cls(status, dumps(value).encode(), pairs)


class Framer(Protocol):
    """The bytes of one streamed response. Not thread-safe: one per response.

    ``media_type`` is the response's content type; ``heartbeats`` says whether
    :meth:`heartbeat` may be sent during silence. :meth:`head` comes first (``b""``: no
    opening), then one :meth:`text` per chunk, then :meth:`end` or :meth:`error`.
    """

    @property
    def media_type(self) -> str: ...

    @property
    def heartbeats(self) -> bool: ...

    def head(self) -> bytes:
        """The opening bytes, before any text (may be empty)."""
        ...

    def text(self, text: str) -> bytes:
        """One chunk of generated text."""
        ...

    def heartbeat(self) -> bytes:
        """What keeps an idle connection alive (only sent if ``heartbeats``)."""
        ...

    def end(self, outcome: Outcome) -> bytes:
        """The last bytes of a stream that finished."""
        ...

    def error(self, error: BaseException) -> bytes | None:
        """The last bytes of a stream that failed after it started, or ``None`` when the
        format can't say it (the body then raises, and the server drops the connection)."""
        ...

    def error_response(self, error: BaseException) -> Reply:
        """The whole response for a failure before the first byte was sent."""
        ...


def problem_reply(error: BaseException, request_id: str | None = None) -> Reply:
    """``application/problem+json`` for ``error`` (naming ``request_id``), with
    ``Retry-After`` when it has one. Never raises."""
    headers = problem_headers(error)
    content_type = headers.pop("Content-Type")
    body = problem(error, request_id)
    return Reply.json(body, int(body["status"]), content_type=content_type, headers=headers)


class _ProblemErrors:
    """Early failures as problem+json naming the request id."""

    def __init__(self, *, request_id: str | None = None) -> None:
        self.request_id = request_id

    def error_response(self, error: BaseException) -> Reply:
        """problem+json."""
        return problem_reply(error, self.request_id)


class SSEFramer(_ProblemErrors):
    """Server-sent events: ``data: {"text": ...}`` per chunk, ``:`` heartbeats, a final
    ``event: done`` with finish reason and usage, or ``event: error`` with a problem
    (naming ``request_id``, so the client can point at the log line with the details)."""

    media_type = "text/event-stream"
    heartbeats = True

    def head(self) -> bytes:
        """Nothing: the first event is the first chunk."""
        return b""

    def text(self, text: str) -> bytes:
        """``data: {"text": ...}``."""
        return encode_chunk(text)

    def heartbeat(self) -> bytes:
        """An SSE comment."""
        return encode_comment()

    def end(self, outcome: Outcome) -> bytes:
        """``event: done`` with the request id, finish reason and usage."""
        return encode_done(
            {
                "id": outcome.id,
                "finish_reason": outcome.finish_reason,
                "usage": {
                    "prompt_tokens": outcome.prompt_tokens,
                    "completion_tokens": outcome.completion_tokens,
                    "total_tokens": outcome.total_tokens,
                },
            }
        )

    def error(self, error: BaseException) -> bytes:
        """``event: error`` with a problem object (no backend text)."""
        return encode_error(problem(error, self.request_id))


class TextFramer(_ProblemErrors):
    """The raw UTF-8 text, nothing around it."""

    media_type = "text/plain; charset=utf-8"
    heartbeats = False

    def head(self) -> bytes:
        """Nothing."""
        return b""

    def text(self, text: str) -> bytes:
        """The chunk's UTF-8 bytes (a lone surrogate becomes U+FFFD, never an error)."""
        return text.encode("utf-8", "replace")

    def heartbeat(self) -> bytes:
        """Never sent (``heartbeats`` is false)."""
        return b""

    def end(self, outcome: Outcome) -> bytes:
        """Nothing: the body just ends."""
        return b""

    def error(self, error: BaseException) -> None:
        """Plain text can't carry an error: the body raises."""
        return None
