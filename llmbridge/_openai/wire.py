"""The OpenAI wire format, without I/O: request validation and response shaping.

Shared by the Flask and the Quart blueprints (:mod:`llmbridge.openai`) so both accept
exactly the same requests and answer with exactly the same bytes. Nothing here touches a
thread, a loop or a framework: a parsed request becomes ``submitter.submit(prompt,
**params)``, a :class:`~llmbridge.Completion` becomes a response object, and
:class:`ChunkShaper` turns streamed text into ``chat.completion.chunk`` /
``text_completion`` SSE events ending with ``data: [DONE]``.

The parameters a request is submitted with are the engine's vocabulary, not OpenAI's:
``max_new_tokens`` (from ``max_tokens`` / ``max_completion_tokens``), ``temperature``,
``top_p``, ``stop`` (a list of strings), ``seed``, and for chat ``messages`` (so an HTTP
backend can forward them unchanged). Only the ones the client sent are passed on.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._core.stream import Completion
from .._exceptions import BadRequest, LLMBridgeError
from .._sansio.problem import client_detail, retry_after_value
from .._sansio.sse import encode_event

__all__ = [
    "ChatTemplate",
    "ChunkShaper",
    "InvalidRequest",
    "ParsedRequest",
    "Settings",
    "decode_json",
    "error_body",
    "model_body",
    "models_body",
    "parse_chat",
    "parse_completion",
    "render_messages",
    "response_body",
    "retry_after_header",
    "ROUTE_METHODS",
    "SSE_HEADERS",
    "method_not_allowed_body",
]

Kind = Literal["chat", "completion"]
ChatTemplate = Callable[[Sequence[Mapping[str, Any]]], str]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class InvalidRequest(BadRequest):
    """A request the OpenAI surface refuses with 400: ``param`` names the culprit field
    and ``code`` is OpenAI's machine-readable reason (``"invalid_type"``, ...)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def render_messages(messages: Sequence[Mapping[str, Any]]) -> str:
    """The default chat template: each message as ``<|role|>\\ncontent\\n``, then
    ``<|assistant|>\\n`` to cue the reply. Pure and deterministic, so an upstream that
    renders the same messages gets the same prompt."""
    parts = [f"<|{m['role']}|>\n{_content_text(m.get('content'))}\n" for m in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # A list of content parts: only text parts carry text for a text model.
    return "".join(part["text"] for part in content if part.get("type") == "text")


@dataclass(frozen=True)
class Settings:
    """What a blueprint accepts: the model names it serves and its input limits.

    ``max_input_chars`` bounds the rendered prompt, ``max_tokens_limit`` the requested
    completion length; ``default_max_tokens`` is submitted when the client gives none
    (``None`` leaves it to the backend).
    """

    models: tuple[str, ...] = ("llmbridge",)
    chat_template: ChatTemplate = render_messages
    max_input_chars: int = 32_000
    max_tokens_limit: int = 4096
    default_max_tokens: int | None = None
    owned_by: str = "llmbridge"


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: what to submit, and how to answer."""

    kind: Kind
    model: str
    prompt: str
    params: dict[str, Any]
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def decode_json(raw: bytes | str) -> Any:
    """Parse a request body. Raises :class:`InvalidRequest` for anything but JSON."""
    if not raw.strip():
        raise InvalidRequest(
            "The request body is empty: send a JSON object.", param=None, code="invalid_json"
        )
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc}.", param=None, code="invalid_json"
        ) from None


def _type_name(value: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _invalid_type(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)}.",
        param=param,
        code="invalid_type",
    )


def _check_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(
            "The request body must be a JSON object.", param=None, code="invalid_json"
        )
    return body


def _model(body: dict[str, Any], settings: Settings) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequest(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    if not isinstance(model, str):
        raise _invalid_type("model", "a string", model)
    if model not in settings.models:
        raise InvalidRequest(
            f"The model '{model}' does not exist; this server serves: "
            + ", ".join(settings.models),
            param="model",
            code="model_not_found",
        )
    return model


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid_type(name, "a number", value)
    if not low <= value <= high:
        raise InvalidRequest(
            f"Invalid '{name}': {value} is not between {low:g} and {high:g}.",
            param=name,
            code="invalid_value",
        )
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(name, "an integer", value)
    return value


def _common(body: dict[str, Any], settings: Settings, prompt: str, where: str) -> dict[str, Any]:
    """The sampling parameters both endpoints share, as engine parameters."""
    if len(prompt) > settings.max_input_chars:
        raise InvalidRequest(
            f"The input is {len(prompt)} characters long; this model accepts at most "
            f"{settings.max_input_chars}. Shorten the {where}.",
            param=where,
            code="context_length_exceeded",
        )
    params: dict[str, Any] = {}
    max_tokens = _integer(body, "max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _integer(body, "max_tokens"), "max_tokens"
    if max_tokens is not None:
        if not 1 <= max_tokens <= settings.max_tokens_limit:
            raise InvalidRequest(
                f"Invalid '{name}': {max_tokens} is not between 1 and {settings.max_tokens_limit}.",
                param=name,
                code="invalid_value",
            )
        params["max_new_tokens"] = max_tokens
    elif settings.default_max_tokens is not None:
        params["max_new_tokens"] = settings.default_max_tokens
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        number = _number(body, key, low, high)
        if number is not None:
            params[key] = number
    seed = _integer(body, "seed")
    if seed is not None:
        params["seed"] = seed
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise InvalidRequest(
            "Only n=1 is supported: send one request per completion.",
            param="n",
            code="invalid_value",
        )
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (
            not isinstance(stop, list)
            or not all(isinstance(s, str) and s for s in stop)
            or len(stop) > 4
        ):
            raise InvalidRequest(
                "Invalid 'stop': expected a non-empty string or an array of at most 4 "
                "non-empty strings.",
                param="stop",
                code="invalid_value",
            )
        params["stop"] = list(stop)
    return params


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid_type("stream", "a boolean", stream)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid_type("stream_options", "an object", options)
        if not stream:
            raise InvalidRequest(
                "'stream_options' is only allowed when 'stream' is true.",
                param="stream_options",
                code="invalid_value",
            )
        flag = options.get("include_usage", False)
        if not isinstance(flag, bool):
            raise _invalid_type("stream_options.include_usage", "a boolean", flag)
        include_usage = flag
    return stream, include_usage


def parse_chat(body: Any, settings: Settings) -> ParsedRequest:
    """Validate a ``/v1/chat/completions`` body. Raises :class:`InvalidRequest`."""
    body = _check_body(body)
    model = _model(body, settings)
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest(
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list):
        raise _invalid_type("messages", "an array", messages)
    if not messages:
        raise InvalidRequest(
            "'messages' must contain at least one message.",
            param="messages",
            code="empty_array",
        )
    clean: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid_type(where, "an object", message)
        role = message.get("role")
        if role is None:
            raise InvalidRequest(
                f"Missing required parameter: '{where}.role'.",
                param=f"{where}.role",
                code="missing_required_parameter",
            )
        if not isinstance(role, str):
            raise _invalid_type(f"{where}.role", "a string", role)
        if role not in _ROLES:
            raise InvalidRequest(
                f"Invalid value for '{where}.role': {role!r}; expected one of "
                + ", ".join(sorted(_ROLES))
                + ".",
                param=f"{where}.role",
                code="invalid_value",
            )
        content = message.get("content")
        if content is None and role != "assistant":
            raise InvalidRequest(
                f"Missing required parameter: '{where}.content'.",
                param=f"{where}.content",
                code="missing_required_parameter",
            )
        if isinstance(content, list):
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or not isinstance(part.get("type"), str)
                    or (part["type"] == "text" and not isinstance(part.get("text"), str))
                ):
                    raise InvalidRequest(
                        f"Invalid content part '{where}.content[{j}]': expected an object "
                        "with a 'type', and a string 'text' for text parts.",
                        param=f"{where}.content[{j}]",
                        code="invalid_value",
                    )
        elif content is not None and not isinstance(content, str):
            raise _invalid_type(f"{where}.content", "a string or an array", content)
        clean.append(message)
    prompt = settings.chat_template(clean)
    params = _common(body, settings, prompt, "messages")
    params["messages"] = clean
    stream, include_usage = _stream_flags(body)
    return ParsedRequest(
        kind="chat",
        model=model,
        prompt=prompt,
        params=params,
        stream=stream,
        include_usage=include_usage,
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
    )


def parse_completion(body: Any, settings: Settings) -> ParsedRequest:
    """Validate a ``/v1/completions`` body. Raises :class:`InvalidRequest`."""
    body = _check_body(body)
    model = _model(body, settings)
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest(
            "Missing required parameter: 'prompt'.",
            param="prompt",
            code="missing_required_parameter",
        )
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the SDK's one-element batch form
    if not isinstance(prompt, str):
        raise InvalidRequest(
            f"Invalid type for 'prompt': expected a string, but got {_type_name(prompt)} "
            "(batches and token arrays are not supported).",
            param="prompt",
            code="invalid_type",
        )
    if not prompt:
        raise InvalidRequest("'prompt' must not be empty.", param="prompt", code="invalid_value")
    params = _common(body, settings, prompt, "prompt")
    stream, include_usage = _stream_flags(body)
    return ParsedRequest(
        kind="completion",
        model=model,
        prompt=prompt,
        params=params,
        stream=stream,
        include_usage=include_usage,
    )


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.total_tokens,
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


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


DONE = encode_event("[DONE]")


class ChunkShaper:
    """Turns one request's streamed text into OpenAI SSE events. Not thread-safe.

    Call :meth:`start` once before the first text (a chat stream opens with the
    assistant role), :meth:`text` for each chunk, then :meth:`end` with the
    :class:`~llmbridge.Completion` (the final chunk, the usage chunk when asked, and
    ``data: [DONE]``) or :meth:`error` (one ``data: {"error": ...}`` event: the
    official SDKs raise it as ``APIError``).
    """

    def __init__(self, parsed: ParsedRequest) -> None:
        self.parsed = parsed

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
        return encode_event(_json(chunk))

    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if self.parsed.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def start(self) -> bytes:
        """The opening event (chat: the assistant role), or nothing for completions."""
        if self.parsed.kind != "chat":
            return b""
        return self._event(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )

    def text(self, text: str) -> bytes:
        """One chunk of generated text."""
        return self._event([self._choice(text, None)])

    def end(self, completion: Completion) -> bytes:
        """The final chunk, the usage chunk if asked for, and ``data: [DONE]``."""
        out = self._event([self._choice(None, _finish_reason(completion.finish_reason))])
        if self.parsed.include_usage:
            out += self._event([], _usage(completion))
        return out + DONE

    def error(self, error: BaseException) -> bytes:
        """An error after the response started: one error event, then the stream ends."""
        _, body = error_body(error)
        return encode_event(_json(body))


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """``(status, {"error": {"message", "type", "param", "code"}})`` for ``error``.

    An :class:`~llmbridge.LLMBridgeError` keeps its own status (429, 503, 502, ...);
    anything else is a 500 whose message reveals nothing of the exception.
    """
    if isinstance(error, InvalidRequest):
        return 400, {
            "error": {
                "message": error.message,
                "type": "invalid_request_error",
                "param": error.param,
                "code": error.code,
            }
        }
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
                "message": client_detail(error),
                "type": kind,
                "param": None,
                "code": _snake(type(error).__name__),
            }
        }
    return 500, {
        "error": {
            "message": "The server failed to handle the request.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


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


#: Every method the routes answer, so a wrong one gets an OpenAI-shaped 405, not HTML.
ROUTE_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def method_not_allowed_body(method: str, allowed: str) -> dict[str, Any]:
    """The OpenAI-shaped body of a 405 for ``method`` where only ``allowed`` is served."""
    return {
        "error": {
            "message": f"Method {method} is not allowed here; use {allowed}.",
            "type": "invalid_request_error",
            "param": None,
            "code": "method_not_allowed",
        }
    }


def retry_after_header(error: BaseException) -> dict[str, str]:
    """``Retry-After`` for an error that has one (whole seconds, rounded up)."""
    after = retry_after_value(error)
    return {} if after is None else {"Retry-After": after}
