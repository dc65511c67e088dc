"""The OpenAI wire format, without I/O: request decoding and validation.

Shared by the Flask and the Quart routes (:mod:`llmbridge.openai`) so both accept exactly
the same requests. Nothing here touches a thread, a loop or a framework: a request body
becomes a :class:`ParsedRequest`, submitted as ``submitter.submit(prompt, **params)``
(responses are shaped in :mod:`llmbridge._openai.responses`).

The parameters a request is submitted with are the engine's vocabulary, not OpenAI's:
``max_new_tokens`` (from ``max_tokens`` / ``max_completion_tokens``), ``temperature``,
``top_p``, ``stop`` (a list of strings), ``seed``, and for chat ``messages`` (so an HTTP
backend can forward them unchanged). Only the ones the client sent are passed on.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._exceptions import BadRequest
from .._sansio.chat import render_messages

__all__ = [
    "PASSTHROUGH_PARAM",
    "ChatTemplate",
    "InvalidRequest",
    "ParsedRequest",
    "Settings",
    "decode_json",
    "parse_chat",
    "parse_completion",
    "render_messages",
]

Kind = Literal["chat", "completion"]
ChatTemplate = Callable[[Sequence[Mapping[str, Any]]], str]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

logger = logging.getLogger("llmbridge.openai")

#: The engine parameter a passthrough request's whole body travels in (see
#: :class:`~llmbridge.backends.OpenAIBackend`).
PASSTHROUGH_PARAM = "openai"

# Fields the parsers read themselves, for every backend.
_INTERPRETED = frozenset(
    {
        "model", "messages", "prompt", "max_tokens", "max_completion_tokens",
        "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
    }
)  # fmt: skip


def _off(*defaults: Any) -> Callable[[Any], bool]:
    return lambda value: (
        value is None or any(value == d and type(value) is type(d) for d in defaults)
    )


# Fields a local backend can't honour: a value other than the field's "off" values is
# a 400 naming the field (for an upstream in passthrough, every field is forwarded).
_UNHONOURED: dict[str, Callable[[Any], bool]] = {
    "tools": _off([]),
    "tool_choice": _off("none", "auto"),
    "functions": _off([]),
    "function_call": _off("none", "auto"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logprobs": _off(False, 0),
    "top_logprobs": _off(0),
    "logit_bias": _off({}),
    "best_of": _off(1),
    "echo": _off(False),
    "suffix": _off(""),
    "audio": _off(),
    "modalities": _off(["text"]),
    "prediction": _off(),
    "presence_penalty": _off(0, 0.0),
    "frequency_penalty": _off(0, 0.0),
    "reasoning_effort": _off(),
    "web_search_options": _off(),
}

# Fields that change nothing a local backend produces: accepted and not used.
_IGNORED = frozenset(
    {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
     "prompt_cache_key", "verbosity"}
)  # fmt: skip


def _check_fields(body: dict[str, Any], passthrough: bool) -> None:
    """Refuse (400, naming it) a field set to a value the backend can't honour; log the
    fields nobody reads at debug. In passthrough every field goes upstream."""
    if passthrough:
        return
    for name, value in body.items():
        if name in _INTERPRETED or name in _IGNORED:
            continue
        is_off = _UNHONOURED.get(name)
        if is_off is None:
            logger.debug("ignoring the unknown request field %r", name)
        elif not is_off(value):
            raise InvalidRequest(
                f"This server's model can't honour '{name}' (it runs locally, not behind "
                "an OpenAI-compatible upstream): leave it out.",
                param=name,
                code="unsupported_parameter",
            )


class InvalidRequest(BadRequest):
    """A request the OpenAI surface refuses (400 unless ``status`` says otherwise: 404,
    405, 413): ``param`` names the culprit field and ``code`` is OpenAI's
    machine-readable reason (``"invalid_type"``, ...)."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Settings:
    """What a blueprint accepts: the model names it serves and its input limits.

    ``max_body_bytes`` bounds the request body (larger ones get 413 before they are read
    whole), ``max_input_chars`` the rendered prompt, ``max_tokens_limit`` the requested
    completion length; ``default_max_tokens`` is submitted when the client gives none
    (``None`` leaves it to the backend). With ``priority_levels`` (opt-in), a request's
    ``priority`` field, an integer from 0 to ``priority_levels - 1`` (higher goes first),
    is submitted as the engine's ``priority``; without it the field is ignored.
    """

    models: tuple[str, ...] = ("llmbridge",)
    chat_template: ChatTemplate = render_messages
    max_body_bytes: int = 1 << 20
    max_input_chars: int = 32_000
    max_tokens_limit: int = 4096
    default_max_tokens: int | None = None
    owned_by: str = "llmbridge"
    priority_levels: int | None = None


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
    #: The answer is the upstream's own, relayed (the body went up in passthrough).
    relay: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


#: Deeper JSON than this is refused: nothing OpenAI sends nests past a few levels, and
#: code that walks a value recursively (an encoder, a cache key) must not overflow.
MAX_JSON_DEPTH = 32

# A \uD800-\uDFFF escape: the only way JSON text that is valid UTF-8 can hold a lone
# surrogate, which no response (or upstream request) could encode again.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _invalid_json(why: str) -> InvalidRequest:
    return InvalidRequest(f"The request body is not valid JSON: {why}.", code="invalid_json")


def decode_json(raw: bytes) -> Any:
    """Parse a request body. Raises :class:`InvalidRequest` for anything but JSON text
    that nests at most :data:`MAX_JSON_DEPTH` levels and holds no lone surrogate."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty: send a JSON object.", code="invalid_json")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise _invalid_json(f"it nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # UnicodeDecodeError and too-long numbers included
        # json's and codecs' messages name a position or a limit, never echo the input.
        raise _invalid_json(str(exc)[:200]) from None
    _check_value(value, surrogates=_SURROGATE_ESCAPE.search(raw) is not None)
    return value


def _check_value(value: Any, *, surrogates: bool) -> None:
    """Walk ``value`` without recursion: refuse deep nesting and lone surrogates."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise _invalid_json(f"it nests deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                if surrogates:
                    stack.extend((key, depth) for key in item)
                items: Any = item.values()
            else:
                items = item
            stack.extend((child, depth + 1) for child in items)
        elif surrogates and isinstance(item, str) and not item.isascii():
            try:
                item.encode()
            except UnicodeEncodeError:
                raise InvalidRequest(
                    "The request body holds a lone UTF-16 surrogate (such as \\ud800), "
                    "which is not text: send valid Unicode.",
                    code="invalid_unicode",
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


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def _model(body: dict[str, Any], settings: Settings) -> str:
    model = body.get("model")
    if model is None:
        raise _missing("model")
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


def _common(
    body: dict[str, Any], settings: Settings, prompt: str, where: str, passthrough: bool
) -> dict[str, Any]:
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
    levels = settings.priority_levels
    if levels is not None:
        priority = _integer(body, "priority")
        if priority is not None:
            if not 0 <= priority < levels:
                raise InvalidRequest(
                    f"Invalid 'priority': {priority} is not between 0 and {levels - 1}.",
                    param="priority",
                    code="invalid_value",
                )
            params["priority"] = priority
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        number = _number(body, key, low, high)
        if number is not None:
            params[key] = number
    seed = _integer(body, "seed")
    if seed is not None:
        if not -(2**63) <= seed < 2**64:
            raise InvalidRequest(
                "Invalid 'seed': expected a 64-bit integer.", param="seed", code="invalid_value"
            )
        params["seed"] = seed
    n = _integer(body, "n")
    if n is not None and n != 1 and not passthrough:
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


def parse_chat(body: Any, settings: Settings, *, passthrough: bool = False) -> ParsedRequest:
    """Validate a ``/v1/chat/completions`` body. Raises :class:`InvalidRequest`.

    ``passthrough``: the backend forwards the whole body upstream (it travels in
    ``params["openai"]``); otherwise a field the local backend can't honour is a 400.
    """
    body = _check_body(body)
    model = _model(body, settings)
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
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
            raise _missing(f"{where}.role")
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
            raise _missing(f"{where}.content")
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
    _check_fields(body, passthrough)
    prompt = settings.chat_template(clean)
    params = _common(body, settings, prompt, "messages", passthrough)
    stream, include_usage = _stream_flags(body)
    if passthrough:
        params[PASSTHROUGH_PARAM] = body
    else:
        params["messages"] = clean
    return ParsedRequest(
        kind="chat",
        model=model,
        prompt=prompt,
        params=params,
        stream=stream,
        include_usage=include_usage,
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        relay=passthrough,
    )


def parse_completion(body: Any, settings: Settings, *, passthrough: bool = False) -> ParsedRequest:
    """Validate a ``/v1/completions`` body. Raises :class:`InvalidRequest`
    (``passthrough`` as for :func:`parse_chat`)."""
    body = _check_body(body)
    model = _model(body, settings)
    prompt = body.get("prompt")
    if prompt is None:
        raise _missing("prompt")
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
    _check_fields(body, passthrough)
    params = _common(body, settings, prompt, "prompt", passthrough)
    stream, include_usage = _stream_flags(body)
    if passthrough:
        params[PASSTHROUGH_PARAM] = body
    return ParsedRequest(
        kind="completion",
        model=model,
        prompt=prompt,
        params=params,
        stream=stream,
        include_usage=include_usage,
        relay=passthrough,
    )
