"""What :class:`~llmbridge.backends.OpenAIBackend` sends and reads, without I/O.

Two request forms. An engine request (``engine.submit(prompt, ...)``,
``engine.chat(messages, ...)``) is translated: engine parameters become OpenAI fields
(:data:`FIELDS`), and only the text of the first choice comes back. A passthrough request
(the ``/v1`` routes put the client's whole body in ``params["openai"]``) is forwarded
field for field, only its ``model`` mapped to the upstream's name, and the answer is
relayed as it came: the JSON body, or each SSE event's ``data`` (with the model mapped
back when the names differ), so tool calls, logprobs, refusals, several choices and
usage details reach the client unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..._exceptions import MAX_RELAYED_CHARS, UpstreamError
from ..._sansio.sse import dumps

__all__ = [
    "FIELDS",
    "Call",
    "Progress",
    "error_object",
    "json_object",
    "message_of",
    "parse_retry_after",
    "reason",
    "stream_error",
]

#: Engine parameters -> OpenAI request fields. Anything else in the params is not sent.
FIELDS = {
    "max_new_tokens": "max_tokens",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "user": "user",
}

#: The engine parameter that carries a client's whole request body (set by the routes).
PASSTHROUGH_PARAM = "openai"


@dataclass(frozen=True, slots=True)
class Call:
    """One request as it goes upstream: the path, the body (``model`` still the
    caller's name), whether the upstream streams, and whether the answer is relayed."""

    path: str
    body: dict[str, Any]
    model: str | None
    stream: bool
    relay: bool

    @classmethod
    def of(cls, prompt: str, params: dict[str, Any], *, model: str | None, stream: bool) -> Call:
        """The upstream call for an engine request (``prompt``, ``params``)."""
        raw = params.get(PASSTHROUGH_PARAM)
        if isinstance(raw, dict):
            body = dict(raw)
            path = "/chat/completions" if "messages" in body else "/completions"
            wanted = body.get("model")
            return cls(
                path,
                body,
                wanted if isinstance(wanted, str) else model,
                body.get("stream") is True,
                relay=True,
            )
        body = {}
        for key, field in FIELDS.items():
            value = params.get(key)
            if value is not None and field not in body:
                body[field] = value
        messages = params.get("messages")
        if messages is not None:
            body["messages"] = messages
            path = "/chat/completions"
        else:
            body["prompt"] = prompt
            path = "/completions"
        streamed = params.get("stream", stream)
        if streamed:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return cls(path, body, params.get("model", model), bool(streamed), relay=False)

    def body_for(self, upstream_model: str | None) -> dict[str, Any]:
        """The body to send to an upstream that names the model ``upstream_model``."""
        if upstream_model is None:
            return self.body
        return {**self.body, "model": upstream_model}


class Progress:
    """What an answer said so far: the first choice's finish reason, the usage, and how
    many content pieces (a token count when the upstream reports no usage)."""

    __slots__ = ("finish", "pieces", "usage")

    def __init__(self) -> None:
        self.finish: str | None = None
        self.usage: dict[str, Any] = {}
        self.pieces = 0

    def read(self, data: dict[str, Any], *, whole: bool) -> str | None:
        """Note what ``data`` (a whole answer, or one stream chunk) says; return the
        first choice's text, or ``None``."""
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        choices = data.get("choices")
        if not isinstance(choices, list):
            return None
        text: Any = None
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            inner = choice.get("message" if whole else "delta")
            text = inner.get("content") if isinstance(inner, dict) else choice.get("text")
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
        if isinstance(text, str) and text:
            self.pieces += 1
            return text
        return None

    @property
    def prompt_tokens(self) -> int | None:
        """The upstream's prompt token count, if it sent usage."""
        return _int(self.usage.get("prompt_tokens"))

    @property
    def completion_tokens(self) -> int | None:
        """The upstream's completion token count, if it sent usage."""
        return _int(self.usage.get("completion_tokens"))


def relayed(
    raw: str, data: dict[str, Any], caller_model: str | None, sent_model: str | None
) -> str:
    """The JSON text to relay: ``raw`` itself, or ``data`` re-encoded with the caller's
    model name where the upstream's differs (a model name map)."""
    if caller_model is None or sent_model is None or caller_model == sent_model:
        return raw
    if data.get("model") == sent_model:
        data = {**data, "model": caller_model}
        return dumps(data)
    return raw


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def reason(value: Any) -> str:
    """An upstream finish reason as ours: OpenAI's names kept, anything else ``stop``."""
    if value in ("length", "tool_calls", "content_filter", "function_call"):
        return str(value)
    return "stop"


def json_object(raw: str | bytes) -> dict[str, Any]:
    """Parse an upstream answer. Raises :class:`~llmbridge.UpstreamError`."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise UpstreamError(
            f"the upstream sent invalid JSON: {exc}", summary="the upstream sent invalid JSON"
        ) from exc
    if not isinstance(data, dict):
        raise UpstreamError(f"the upstream sent {type(data).__name__}, expected a JSON object")
    return data


def message_of(raw: bytes) -> str:
    """The human part of an error body: OpenAI's ``error.message``, a problem's
    ``detail``, else the start of the text."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:200].decode(errors="replace").strip()
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        for key in ("detail", "message"):
            if isinstance(data.get(key), str):
                return str(data[key])
    return raw[:200].decode(errors="replace").strip()


def error_object(raw: bytes) -> dict[str, str | None] | None:
    """The OpenAI error object in an error body (``{"error": {"message": ...}}``): its
    ``message``, ``type``, ``param`` and ``code`` only, each a string cut to
    :data:`~llmbridge._exceptions.MAX_RELAYED_CHARS` characters or ``None`` (an integer
    ``code``, as llama.cpp's server and vLLM send, as its digits). ``None`` when the body
    is not one (an HTML page, a bare string, no string ``message``)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    return {key: _relayable(error.get(key)) for key in ("message", "type", "param", "code")}


def _relayable(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value[:MAX_RELAYED_CHARS] if isinstance(value, str) else None


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (an HTTP date, rare from LLM APIs: ``None``)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def stream_error(error: Any) -> UpstreamError:
    """An ``{"error": ...}`` event inside a stream."""
    message = error.get("message") if isinstance(error, dict) else error
    return UpstreamError(
        f"the upstream failed mid-stream: {message}",
        retryable=False,
        summary="the upstream failed mid-stream",
    )
