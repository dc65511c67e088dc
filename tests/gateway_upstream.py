"""A fake OpenAI-compatible upstream, served by uvicorn in its own process.

It answers ``/v1/chat/completions`` and ``/v1/completions`` in OpenAI's exact shapes,
streamed and not: content, tool calls (and their streamed argument deltas), JSON-schema
structured outputs, refusals, several choices (``n``), logprobs (chat's
``logprobs.content`` and completions' ``tokens`` / ``token_logprobs`` / ``top_logprobs``
/ ``text_offset``), and usage with its details. Everything is deterministic (the id is a
hash of the request, ``created`` is fixed, the model is the one asked for), so an answer
through a gateway can be compared field by field with the answer the upstream gives
directly. ``max_tokens`` cuts answers (``finish_reason: "length"``).

``GET /v1/_requests`` lists every body received (what a gateway forwarded);
``DELETE /v1/_requests`` forgets them. Knobs (environment): ``UPSTREAM_NAME`` (in
``system_fingerprint`` and the ``x-upstream`` header), ``TOKEN_DELAY`` (seconds between
streamed chunks, and before a whole answer), ``RETRY_AFTER`` (its 429s' header).

A request whose last message (or prompt) is ``upstream-error:<kind>`` gets the error
:data:`ERRORS` names instead, streamed or not, as real upstreams answer them: an OpenAI
error object (with fields a client must not see), a 401 that echoes part of the key, an
HTML 404 (a wrong base URL), a 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

NAME = os.environ.get("UPSTREAM_NAME", "fake")
DELAY = float(os.environ.get("TOKEN_DELAY", "0"))
CREATED = 1_700_000_000
FINGERPRINT = f"fp_{NAME}"
RECEIVED: list[dict[str, Any]] = []
RETRY_AFTER = os.environ.get("RETRY_AFTER", "7")
LONG = "x" * 5_000

#: kind -> (status, body, content type) of the errors a request can ask for.
ERRORS: dict[str, tuple[int, str, str]] = {
    "400": (
        400,
        json.dumps(
            {
                "error": {
                    "message": "Invalid schema for function 'get_weather': 'days' is not valid.",
                    "type": "invalid_request_error",
                    "param": "tools[0].function.parameters",
                    "code": "invalid_function_parameters",
                    "internal": "upstream-secret-trace",
                },
                "trace": "upstream-secret-trace",
            }
        ),
        "application/json",
    ),
    "400long": (
        400,
        json.dumps({"error": {"message": LONG, "type": LONG, "param": None, "code": 400}}),
        "application/json",
    ),
    "404": (
        404,
        json.dumps(
            {
                "error": {
                    "message": "The model 'nope' does not exist.",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            }
        ),
        "application/json",
    ),
    "422": (
        422,
        json.dumps({"error": {"message": "max_tokens is too large: 99999.", "code": None}}),
        "application/json",
    ),
    "401": (
        401,
        json.dumps(
            {
                "error": {
                    "message": "Incorrect API key provided: sk-up****ream.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
        ),
        "application/json",
    ),
    "404html": (404, "<html><body><h1>404 Not Found (nginx)</h1></body></html>", "text/html"),
    "429": (
        429,
        json.dumps({"error": {"message": "Rate limit reached for sk-up****ream.", "code": None}}),
        "application/json",
    ),
}


def _error_kind(body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    last = messages[-1].get("content") if isinstance(messages, list) and messages else None
    marker = last if isinstance(last, str) else body.get("prompt")
    if isinstance(marker, str) and marker.startswith("upstream-error:"):
        return marker.split(":", 1)[1]
    return None


def example(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """A deterministic value that satisfies a (simple) JSON schema."""
    if not isinstance(schema, dict):
        return None
    defs = {**(defs or {}), **schema.get("$defs", {}), **schema.get("definitions", {})}
    if "$ref" in schema:
        return example(defs.get(schema["$ref"].rsplit("/", 1)[-1], {}), defs)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return example(options[0], defs)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: example(sub, defs) for name, sub in props.items()}
    if kind == "array":
        return [example(schema.get("items", {"type": "string"}), defs)]
    return {"string": "Paris", "integer": 3, "number": 1.5, "boolean": True}.get(kind)


def _pieces(text: str, size: int = 6) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _limit(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) else None


def _logprob(token: str, k: int, top: int) -> dict[str, Any]:
    def one(t: str, j: int) -> dict[str, Any]:
        return {"token": t, "logprob": round(-0.125 * (k + j + 1), 6), "bytes": list(t.encode())}

    return {
        **one(token, 0),
        "top_logprobs": [one(token if j == 0 else f"alt{j}", j) for j in range(top)],
    }


class Plan:
    """What one choice answers: content pieces, tool calls or a refusal."""

    def __init__(self, body: dict[str, Any], index: int, chat: bool) -> None:
        self.index = index
        self.content: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.refusal: str | None = None
        self.finish = "stop"
        last = ""
        if chat:
            for message in reversed(body.get("messages", [])):
                if isinstance(message.get("content"), str):
                    last = message["content"]
                    break
        tools = body.get("tools") or []
        choice = body.get("tool_choice")
        has_tool_answer = any(m.get("role") == "tool" for m in body.get("messages", []))
        fmt = body.get("response_format") or {}
        if chat and tools and choice != "none" and not has_tool_answer:
            chosen = tools
            if isinstance(choice, dict):
                chosen = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
            if body.get("parallel_tool_calls") is False:
                chosen = chosen[:1]
            for k, tool in enumerate(chosen):
                seed = f"{index}-{k}-{tool['function']['name']}"
                self.tool_calls.append(
                    {
                        "id": "call_" + hashlib.sha256(seed.encode()).hexdigest()[:24],
                        "type": "function",
                        "function": {
                            "name": tool["function"]["name"],
                            "arguments": json.dumps(example(tool["function"].get("parameters"))),
                        },
                    }
                )
            self.finish = "tool_calls"
            return
        if chat and "refuse" in last:
            self.refusal = "I'm sorry, I can't help with that."
            return
        if fmt.get("type") == "json_schema":
            text = json.dumps(example(fmt["json_schema"].get("schema", {})))
            self.content = _pieces(text)
            return
        if fmt.get("type") == "json_object":
            self.content = _pieces(json.dumps({"answer": "hello"}))
            return
        words = ["Answer", f" {index}", ":", " hello", " from", " the", " fake", " upstream", "."]
        limit = _limit(body)
        if limit is not None and limit < len(words):
            words, self.finish = words[:limit], "length"
        self.content = words

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def tokens(self) -> int:
        if self.tool_calls:
            return sum(len(c["function"]["arguments"]) // 4 + 1 for c in self.tool_calls)
        if self.refusal is not None:
            return len(self.refusal.split())
        return len(self.content)


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        text = " ".join(str(m.get("content") or "") for m in body["messages"])
    else:
        text = str(body.get("prompt", ""))
    return len(text.split()) + 3


def _usage(body: dict[str, Any], plans: list[Plan]) -> dict[str, Any]:
    prompt = _prompt_tokens(body)
    completion = sum(p.tokens for p in plans)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _id(prefix: str, body: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return f"{prefix}-{digest[:24]}"


def _chat_logprobs(plan: Plan, body: dict[str, Any], pieces: list[str], start: int) -> Any:
    if not body.get("logprobs") or plan.tool_calls:
        return None
    top = int(body.get("top_logprobs") or 0)
    if plan.refusal is not None:
        return {
            "content": None,
            "refusal": [_logprob(p, start + k, top) for k, p in enumerate(pieces)],
        }
    return {"content": [_logprob(p, start + k, top) for k, p in enumerate(pieces)], "refusal": None}


def _completion_logprobs(body: dict[str, Any], pieces: list[str], offset: int, start: int) -> Any:
    top = body.get("logprobs")
    if not isinstance(top, int) or isinstance(top, bool):
        return None
    offsets, at = [], offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": [round(-0.125 * (start + k + 1), 6) for k in range(len(pieces))],
        "top_logprobs": [
            {
                p: round(-0.125 * (start + k + 1), 6),
                **{f"alt{j}": round(-0.125 * (start + k + j + 1), 6) for j in range(1, top)},
            }
            for k, p in enumerate(pieces)
        ],
        "text_offset": offsets,
    }


def whole(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    plans = [Plan(body, i, chat) for i in range(int(body.get("n") or 1))]
    choices: list[dict[str, Any]] = []
    for plan in plans:
        if chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if plan.tool_calls or plan.refusal is not None else plan.text,
                "refusal": plan.refusal,
                "annotations": [],
            }
            if plan.tool_calls:
                message["tool_calls"] = plan.tool_calls
            pieces = [plan.refusal] if plan.refusal is not None else plan.content
            choices.append(
                {
                    "index": plan.index,
                    "message": message,
                    "logprobs": _chat_logprobs(plan, body, pieces, 0),
                    "finish_reason": plan.finish,
                }
            )
        else:
            choices.append(
                {
                    "text": plan.text,
                    "index": plan.index,
                    "logprobs": _completion_logprobs(body, plan.content, 0, 0),
                    "finish_reason": plan.finish,
                }
            )
    return {
        "id": _id("chatcmpl" if chat else "cmpl", body),
        "object": "chat.completion" if chat else "text_completion",
        "created": CREATED,
        "model": body.get("model"),
        "choices": choices,
        "usage": _usage(body, plans),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }


async def streamed(body: dict[str, Any], chat: bool) -> AsyncIterator[bytes]:
    plans = [Plan(body, i, chat) for i in range(int(body.get("n") or 1))]
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base: dict[str, Any] = {
        "id": _id("chatcmpl" if chat else "cmpl", body),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": CREATED,
        "model": body.get("model"),
    }
    if chat:
        base["service_tier"] = "default"
    base["system_fingerprint"] = FINGERPRINT

    def event(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        chunk = {**base, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n".encode()

    for plan in plans:
        if chat:
            opening: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
            if plan.tool_calls:
                opening = {"role": "assistant", "content": None, "refusal": None}
            if not plan.tool_calls:
                yield event(
                    [
                        {
                            "index": plan.index,
                            "delta": opening,
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            for k, call in enumerate(plan.tool_calls):
                head = {
                    "index": k,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""},
                }
                delta = {**opening, "tool_calls": [head]} if k == 0 else {"tool_calls": [head]}
                yield event(
                    [{"index": plan.index, "delta": delta, "logprobs": None, "finish_reason": None}]
                )
                for piece in _pieces(call["function"]["arguments"], 8):
                    await asyncio.sleep(DELAY)
                    delta = {"tool_calls": [{"index": k, "function": {"arguments": piece}}]}
                    yield event(
                        [
                            {
                                "index": plan.index,
                                "delta": delta,
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
            field, pieces = (
                ("refusal", _pieces(plan.refusal, 8))
                if plan.refusal is not None
                else ("content", plan.content)
            )
            for k, piece in enumerate(pieces):
                await asyncio.sleep(DELAY)
                logprobs = _chat_logprobs(plan, body, [piece], k)
                yield event(
                    [
                        {
                            "index": plan.index,
                            "delta": {field: piece},
                            "logprobs": logprobs,
                            "finish_reason": None,
                        }
                    ]
                )
            yield event(
                [{"index": plan.index, "delta": {}, "logprobs": None, "finish_reason": plan.finish}]
            )
        else:
            offset = 0
            for k, piece in enumerate(plan.content):
                await asyncio.sleep(DELAY)
                logprobs = _completion_logprobs(body, [piece], offset, k)
                offset += len(piece)
                yield event(
                    [
                        {
                            "text": piece,
                            "index": plan.index,
                            "logprobs": logprobs,
                            "finish_reason": None,
                        }
                    ]
                )
            yield event(
                [{"text": "", "index": plan.index, "logprobs": None, "finish_reason": plan.finish}]
            )
    if include_usage:
        yield event([], _usage(body, plans))
    yield b"data: [DONE]\n\n"


async def generate(request: Request) -> Response:
    body = await request.json()
    RECEIVED.append(body)
    chat = request.url.path.endswith("/chat/completions")
    headers = {"x-upstream": NAME}
    kind = _error_kind(body)
    if kind is not None:
        status, text, media_type = ERRORS[kind]
        if status == 429:
            headers["retry-after"] = RETRY_AFTER
        return Response(text, status_code=status, media_type=media_type, headers=headers)
    if body.get("stream"):
        return StreamingResponse(
            streamed(body, chat), media_type="text/event-stream", headers=headers
        )
    await asyncio.sleep(DELAY)
    return JSONResponse(whole(body, chat), headers=headers)


async def requests_seen(request: Request) -> Response:
    if request.method == "DELETE":
        RECEIVED.clear()
    return JSONResponse(RECEIVED)


app = Starlette(
    routes=[
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/_requests", requests_seen, methods=["GET", "DELETE"]),
    ]
)
