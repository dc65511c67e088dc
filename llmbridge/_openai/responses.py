"""The OpenAI wire format's answers, without I/O: bodies, errors and stream chunks.

A :class:`~llmbridge.Completion` becomes a ``chat.completion`` / ``text_completion``
object (:func:`response_body`); :class:`OpenAIFramer` is the
:class:`~llmbridge._sansio.framing.Framer` that turns a streamed answer into
``chat.completion.chunk`` / ``text_completion`` SSE events ending with ``data: [DONE]``;
every error becomes OpenAI's ``{"error": {"message", "type", "param", "code"}}``
(:func:`error_body`, :func:`error_reply`), whatever it is, revealing no backend text
(an OpenAI-compatible upstream's own 4xx error object, written for the API client, is
relayed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._core.channel import Completion
from .._exceptions import LLMBridgeError, UpstreamRejected
from .._sansio.framing import Outcome, Reply
from .._sansio.problem import client_detail, retry_after_value
from .._sansio.sse import dumps, encode_comment, encode_event
from .wire import InvalidRequest, ParsedRequest, Settings

__all__ = [
    "DONE",
    "ROUTE_METHODS",
    "SSE_HEADERS",
    "OpenAIFramer",
    "RelayFramer",
    "error_body",
    "error_reply",
    "model_body",
    "models_body",
    "relay_reply",
    "response_body",
    "retry_after_header",
]

#: Every method the routes answer, so a wrong one gets an OpenAI-shaped 405, not HTML.
ROUTE_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = encode_event("[DONE]")


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.total_tokens,
    }


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length", "content_filter", "tool_calls") else "stop"


def response_body(parsed: ParsedRequest, completion: Completion) -> dict[str, Any]:
    """The whole (non-streamed) answer: a ``chat.completion`` or ``text_completion``."""
    reason = _finish_reason(completion.finish_reason)
    choice: dict[str, Any]
    if parsed.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": None,
            "finish_reason": reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {
        "id": parsed.id,
        "object": obj,
        "created": parsed.created,
        "model": parsed.model,
        "choices": [choice],
        "usage": _usage(completion),
    }


class OpenAIFramer:
    """One request's streamed text as OpenAI SSE events. Not thread-safe: one per response.

    A chat stream opens with the assistant role; each chunk is one event; a finished
    stream ends with the final chunk (its ``finish_reason``), the usage chunk when
    ``stream_options.include_usage`` asked for it, and ``data: [DONE]``; a failed one
    with one ``data: {"error": ...}`` event (the official SDKs raise it as ``APIError``).
    ``request_id`` is named in error messages that hide a backend's text; ``report`` is
    called with every error framed (to log it).
    """

    media_type = "text/event-stream"
    heartbeats = True

    def __init__(
        self,
        parsed: ParsedRequest,
        *,
        request_id: str | None = None,
        report: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.parsed = parsed
        self.request_id = request_id
        self._report = report

    def _event(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        parsed = self.parsed
        chunk: dict[str, Any] = {
            "id": parsed.id,
            "object": "chat.completion.chunk" if parsed.kind == "chat" else "text_completion",
            "created": parsed.created,
            "model": parsed.model,
            "choices": choices,
        }
        if parsed.include_usage:
            chunk["usage"] = usage
        return encode_event(dumps(chunk))

    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if self.parsed.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def head(self) -> bytes:
        """The opening event (chat: the assistant role), or nothing for completions."""
        if self.parsed.kind != "chat":
            return b""
        opening = {"index": 0, "delta": {"role": "assistant", "content": ""}}
        return self._event([{**opening, "logprobs": None, "finish_reason": None}])

    def text(self, text: str) -> bytes:
        """One chunk of generated text."""
        return self._event([self._choice(text, None)])

    def heartbeat(self) -> bytes:
        """An SSE comment (the SDKs skip it)."""
        return encode_comment()

    def end(self, outcome: Outcome) -> bytes:
        """The final chunk, the usage chunk if asked for, and ``data: [DONE]``."""
        out = self._event([self._choice(None, _finish_reason(outcome.finish_reason))])
        if self.parsed.include_usage:
            out += self._event([], _usage(outcome))
        return out + DONE

    def error(self, error: BaseException) -> bytes:
        """An error after the response started: one error event, then the stream ends."""
        if self._report is not None:
            self._report(error)
        _, body = error_body(error, self.request_id)
        return encode_event(dumps(body))

    def error_response(self, error: BaseException) -> Reply:
        """The OpenAI-shaped JSON error for a failure before the first byte."""
        if self._report is not None:
            self._report(error)
        return error_reply(error, self.request_id)


class RelayFramer(OpenAIFramer):
    """A passthrough stream: the text already is the upstream's SSE events (tool-call
    deltas, logprobs, several choices, usage: all as the upstream sent them), so they
    are relayed as they are, then ``data: [DONE]``. Errors are framed as
    :class:`OpenAIFramer`'s. Not thread-safe: one per response."""

    def head(self) -> bytes:
        """Nothing: the upstream's first event comes first."""
        return b""

    def text(self, text: str) -> bytes:
        """Whole SSE events, relayed."""
        return text.encode("utf-8", "replace")

    def end(self, outcome: Outcome) -> bytes:
        """``data: [DONE]`` (the upstream's usage chunk, if any, was relayed already)."""
        return DONE


def relay_reply(text: str, headers: dict[str, str]) -> Reply:
    """A passthrough whole answer: the upstream's JSON body, as it came."""
    pairs = [("Content-Type", "application/json"), *headers.items()]
    return Reply(200, text.encode("utf-8", "replace"), pairs)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


def error_body(error: BaseException, request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """``(status, {"error": {"message", "type", "param", "code"}})`` for ``error``.

    An :class:`InvalidRequest` keeps its status and names its ``param``; an upstream's
    own 4xx (:class:`~llmbridge.UpstreamRejected`) is relayed: its status, and its error
    object's ``message``, ``type``, ``param`` and ``code`` only (each already cut to
    1,000 characters); any other :class:`~llmbridge.LLMBridgeError` keeps its own status
    (429, 503, 502, ...) and says only what is public; anything else is a 500 that
    reveals nothing. Never raises.
    """
    if isinstance(error, InvalidRequest):
        return error.status, {
            "error": {
                "message": error.message,
                "type": "invalid_request_error",
                "param": error.param,
                "code": error.code,
            }
        }
    if isinstance(error, UpstreamRejected):
        return error.status, {"error": dict(error.error_object)}
    if isinstance(error, LLMBridgeError):
        status = error.status
        if status == 429:
            kind = "rate_limit_error"
        elif status >= 500:
            kind = "server_error"
        else:
            kind = _TYPES.get(status, "invalid_request_error")
        return status, {
            "error": {
                "message": client_detail(error, request_id),
                "type": kind,
                "param": None,
                "code": _snake(type(error).__name__),
            }
        }
    return 500, {
        "error": {
            "message": client_detail(error, request_id),
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


def error_reply(
    error: BaseException, request_id: str | None = None, headers: dict[str, str] | None = None
) -> Reply:
    """The whole JSON response for ``error``, with ``Retry-After`` when it has one."""
    status, body = error_body(error, request_id)
    return Reply.json(body, status, headers={**retry_after_header(error), **(headers or {})})


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


def models_body(settings: Settings) -> dict[str, Any]:
    """The ``/v1/models`` list."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": settings.owned_by}
            for name in settings.models
        ],
    }


def model_body(settings: Settings, model: str) -> dict[str, Any] | None:
    """One ``/v1/models/{model}`` entry, or ``None`` if this server doesn't serve it."""
    if model not in settings.models:
        return None
    return {"id": model, "object": "model", "created": 0, "owned_by": settings.owned_by}


def retry_after_header(error: BaseException) -> dict[str, str]:
    """``Retry-After`` for an error that has one (whole seconds, rounded up)."""
    after = retry_after_value(error)
    return {} if after is None else {"Retry-After": after}
