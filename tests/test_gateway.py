"""The OpenAI gateway: ``/v1`` over :class:`~llmbridge.backends.OpenAIBackend` forwards
whole requests and relays whole answers.

Real processes on 127.0.0.1: the fake upstream (``tests/gateway_upstream.py``, uvicorn),
a Flask gateway under gunicorn and a Quart gateway under uvicorn
(``tests/gateway_apps.py``). Each answer through a gateway is compared field by field
with the answer the upstream gives directly, with the official ``openai`` SDK,
LangChain's ``ChatOpenAI`` and LlamaIndex's ``OpenAILike`` as clients.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from support import PYTHON, Server, free_port, run_server

MODEL = "gpt-test"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["location", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "population": {"type": "integer"},
                "coastal": {"type": "boolean"},
                "districts": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["name", "population", "coastal", "districts"],
            "additionalProperties": False,
        },
    },
}


def _chat(content: str = "What is the weather in Paris?", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


#: Request bodies whose answers must come back unchanged, chat and completions.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "tools": ("chat", _chat(tools=[WEATHER, TIME], tool_choice="auto")),
    "tool_choice": (
        "chat",
        _chat(
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        ),
    ),
    "structured": ("chat", _chat("Describe Paris.", response_format=SCHEMA)),
    "n2": ("chat", _chat("Hi", n=2, max_tokens=5)),
    "logprobs": ("chat", _chat("Hi", logprobs=True, top_logprobs=2, n=2)),
    "refusal": ("chat", _chat("please refuse this", logprobs=True)),
    "fields": (
        "chat",
        _chat(
            "Hi",
            logit_bias={"1234": -100},
            user="user-7",
            metadata={"team": "qa"},
            parallel_tool_calls=False,
            tools=[WEATHER, TIME],
            seed=3,
        ),
    ),
    "completion_logprobs": (
        "completion",
        {"model": MODEL, "prompt": "Say hi", "logprobs": 2, "n": 2, "max_tokens": 6},
    ),
}


def _path(kind: str) -> str:
    return "/chat/completions" if kind == "chat" else "/completions"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Server]:
    """The fake upstream, under uvicorn."""
    port = free_port()
    args = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
            "--no-access-log", "gateway_upstream:app"]  # fmt: skip
    with run_server(args, port=port, env={"UPSTREAM_NAME": "one"}) as server:
        yield server


def _gateway(kind: str, upstream: Server, **env: str) -> Any:
    port = free_port()
    if kind == "flask":
        args = [PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "16", "-w", "1",
                "-b", "127.0.0.1:{port}", "gateway_apps:app"]  # fmt: skip
    else:
        args = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
                "--no-access-log", "gateway_apps:app"]  # fmt: skip
    full = {"GATEWAY_APP": kind, "UPSTREAM_URLS": f"{upstream.url}/v1", **env}
    return run_server(args, port=port, env=full)


@pytest.fixture(scope="module", params=["flask", "quart"])
def gateway(request: pytest.FixtureRequest, upstream: Server) -> Iterator[Server]:
    """A Flask gateway under gunicorn, then a Quart gateway under uvicorn."""
    with _gateway(request.param, upstream, MODEL_MAP="gpt-mapped=fake-model") as server:
        yield server


def _events(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _received(upstream: Server) -> list[dict[str, Any]]:
    return list(httpx.get(f"{upstream.url}/v1/_requests", timeout=10).json())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.timeout(60)
def test_whole_answers_round_trip_unchanged(upstream: Server, gateway: Server, case: str) -> None:
    """Tool calls, structured output, n=2, logprobs, refusals, usage details: a
    non-streamed answer through the gateway equals the upstream's own, field by field;
    the upstream was called without streaming and got every field the client sent."""
    kind, body = CASES[case]
    with httpx.Client(timeout=30) as client:
        direct = client.post(f"{upstream.url}/v1{_path(kind)}", json=body)
        client.delete(f"{upstream.url}/v1/_requests")
        through = client.post(f"{gateway.url}/v1{_path(kind)}", json=body)
    assert direct.status_code == through.status_code == 200, through.text
    assert through.headers["content-type"].startswith("application/json")
    assert through.json() == direct.json()
    assert through.headers["x-request-id"]
    [forwarded] = _received(upstream)
    assert forwarded == body  # every field, unchanged; no "stream": true added


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.timeout(60)
def test_streamed_answers_round_trip_unchanged(
    upstream: Server, gateway: Server, case: str
) -> None:
    """Streamed: every chunk (tool-call deltas, logprobs, several choices, the usage
    chunk) through the gateway equals the upstream's own, in order."""
    kind, body = CASES[case]
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=30) as client:
        direct = _events(client.post(f"{upstream.url}/v1{_path(kind)}", json=body))
        client.delete(f"{upstream.url}/v1/_requests")
        through = _events(client.post(f"{gateway.url}/v1{_path(kind)}", json=body))
    assert through == direct
    assert len(through) > 3
    assert through[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    [forwarded] = _received(upstream)
    assert forwarded == body


@pytest.mark.timeout(60)
def test_a_model_name_map_is_applied_both_ways(upstream: Server, gateway: Server) -> None:
    """The client's model name goes upstream as the mapped one and comes back as its own."""
    body = _chat("Hi", model="gpt-mapped")
    with httpx.Client(timeout=30) as client:
        client.delete(f"{upstream.url}/v1/_requests")
        whole = client.post(f"{gateway.url}/v1/chat/completions", json=body).json()
        chunks = _events(
            client.post(f"{gateway.url}/v1/chat/completions", json={**body, "stream": True})
        )
    assert whole["model"] == "gpt-mapped"
    assert {c["model"] for c in chunks} == {"gpt-mapped"}
    assert [r["model"] for r in _received(upstream)] == ["fake-model", "fake-model"]


@pytest.mark.timeout(60)
def test_openai_sdk_tool_calls_streamed_and_not(upstream: Server, gateway: Server) -> None:
    """The official SDK parses the gateway's tool calls exactly as the upstream's."""
    messages: Any = [{"role": "user", "content": "weather?"}]

    def run(base: str) -> tuple[Any, Any, Any]:
        with openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=30) as c:
            whole = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])  # type: ignore[list-item]
            stream = c.chat.completions.create(
                model=MODEL,
                messages=messages,
                tools=[WEATHER],
                stream=True,  # type: ignore[list-item]
            )
            calls: dict[int, dict[str, str]] = {}
            for chunk in stream:
                for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                    slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                    slot["id"] += call.id or ""
                    slot["name"] += (call.function.name or "") if call.function else ""
                    slot["arguments"] += (call.function.arguments or "") if call.function else ""
            parsed = c.chat.completions.parse(
                model=MODEL, messages=messages, response_format=SCHEMA
            )  # type: ignore[call-overload]
            return whole.model_dump(), calls, parsed.choices[0].message.content

    direct, through = run(upstream.url), run(gateway.url)
    assert through == direct
    whole, calls, structured = through
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    assert json.loads(calls[0]["arguments"]) == {"location": "Paris", "days": 3}
    assert calls[0]["name"] == "get_weather"
    assert json.loads(structured)["coastal"] is True


@pytest.mark.timeout(90)
def test_langchain_chat_openai(upstream: Server, gateway: Server) -> None:
    """LangChain's ChatOpenAI: tools (invoke and stream), with_structured_output (its
    default json_schema), n=2 and logprobs give the same through the gateway as direct."""
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    def run(base: str) -> dict[str, Any]:
        llm = ChatOpenAI(model=MODEL, base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=30)  # type: ignore[arg-type]
        tooled = llm.bind_tools([WEATHER])
        called = tooled.invoke("weather in Paris?")
        streamed = functools.reduce(operator.add, tooled.stream("weather in Paris?"))
        city = llm.with_structured_output(City).invoke("Describe Paris")
        two = ChatOpenAI(model=MODEL, base_url=f"{base}/v1", api_key="k", n=2, max_retries=0)  # type: ignore[arg-type]
        generations = two.generate([[HumanMessage("hi")]]).generations[0]
        logprobs = llm.bind(logprobs=True, top_logprobs=2).invoke("hi")
        return {
            "tool_calls": called.tool_calls,  # type: ignore[attr-defined]
            "meta": {k: v for k, v in called.response_metadata.items() if k != "id"},
            "streamed": streamed.tool_calls,  # type: ignore[attr-defined]
            "city": city,
            "n": [g.text for g in generations],
            "logprobs": logprobs.response_metadata["logprobs"],
        }

    direct, through = run(upstream.url), run(gateway.url)
    assert through == direct
    assert through["tool_calls"][0]["args"] == {"location": "Paris", "days": 3}
    assert through["streamed"][0]["args"] == {"location": "Paris", "days": 3}
    assert through["city"] == City(name="Paris", population=3)
    assert through["n"] == [
        "Answer 0: hello from the fake upstream.",
        "Answer 1: hello from the fake upstream.",
    ]
    assert len(through["logprobs"]["content"][0]["top_logprobs"]) == 2


@pytest.mark.timeout(90)
def test_llamaindex_openai_like_chat_and_completion(upstream: Server, gateway: Server) -> None:
    """LlamaIndex's OpenAILike, chat and completion modes, streamed and not, and its
    tool calling: the same through the gateway as direct."""
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.openai_like import OpenAILike

    def get_weather(location: str, days: int) -> str:
        """The weather in a city."""
        return "sunny"

    tool = FunctionTool.from_defaults(fn=get_weather)

    def run(base: str) -> dict[str, Any]:
        common: dict[str, Any] = {
            "model": MODEL,
            "api_base": f"{base}/v1",
            "api_key": "k",
            "max_retries": 0,
        }
        chat = OpenAILike(is_chat_model=True, is_function_calling_model=True, **common)
        plain = OpenAILike(is_chat_model=False, **common)
        messages = [ChatMessage(role="user", content="hello")]
        called = chat.chat_with_tools([tool], user_msg="weather in Paris?")
        return {
            "chat": chat.chat(messages).raw,
            "stream_chat": "".join(r.delta or "" for r in chat.stream_chat(messages)),
            "complete": plain.complete("hello").raw,
            "stream_complete": "".join(r.delta or "" for r in plain.stream_complete("hello")),
            "tools": [
                (c.tool_name, c.tool_kwargs)
                for c in chat.get_tool_calls_from_response(called, error_on_no_tool_call=True)
            ],
        }

    direct, through = run(upstream.url), run(gateway.url)
    assert _plain(through) == _plain(direct)
    assert through["stream_chat"] == "Answer 0: hello from the fake upstream."
    assert through["tools"] == [("get_weather", {"location": "Paris", "days": 3})]


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@pytest.mark.timeout(90)
def test_the_cache_keys_on_the_whole_request(upstream: Server) -> None:
    """With a Pipeline cache in front (a policy), a repeated request is answered from
    the cache, streamed and not; one that differs only in a passthrough field (tools,
    logprobs) goes upstream again."""
    with _gateway("quart", upstream, GATEWAY_CACHE="1") as gw, httpx.Client(timeout=30) as client:
        client.delete(f"{upstream.url}/v1/_requests")
        url = f"{gw.url}/v1/chat/completions"
        replies = [
            client.post(url, json=_chat("cache me", **fields))
            for fields in ({"tools": [WEATHER]}, {"tools": [WEATHER]}, {"tools": [TIME]},
                           {"logprobs": True})
        ]  # fmt: skip
        assert [r.status_code for r in replies] == [200] * 4, replies[0].text
        first, again, other, logprobs = (r.json() for r in replies)
        streamed = [
            _events(client.post(url, json=_chat("cache me", stream=True))) for _ in range(2)
        ]
        seen = _received(upstream)
    assert again == first
    assert other != first
    assert logprobs["choices"][0]["logprobs"] is not None
    assert streamed[0] == streamed[1]
    assert [bool(r.get("stream")) for r in seen] == [False, False, False, True]


@pytest.mark.timeout(60)
def test_local_backends_refuse_fields_they_cannot_honour() -> None:
    """Over a local engine, a field set to a value the model can't honour is a 400
    naming it; an unknown field, or one set to its 'off' value, is accepted."""
    from openai_servers import serve

    with serve("werkzeug") as server, httpx.Client(timeout=30) as client:
        url = f"{server.url}/v1/chat/completions"
        base = {"model": "sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
        for field, value in [
            ("tools", [WEATHER]),
            ("response_format", SCHEMA),
            ("logprobs", True),
            ("logit_bias", {"1": 5}),
            ("n", 2),
        ]:
            reply = client.post(url, json={**base, field: value})
            assert reply.status_code == 400, (field, reply.text)
            assert reply.json()["error"]["param"] == field
            assert field in reply.json()["error"]["message"]
        for extra in [{"some_future_field": 1}, {"tools": []}, {"logprobs": False}, {"user": "u"}]:
            reply = client.post(url, json={**base, **extra})
            assert reply.status_code == 200, (extra, reply.text)
        done = client.post(
            f"{server.url}/v1/completions",
            json={"model": "sim", "prompt": "x", "logprobs": 3},
        )
        assert done.status_code == 400
        assert done.json()["error"]["param"] == "logprobs"


@pytest.mark.timeout(60)
def test_bridge_chat_streams_without_a_dummy_prompt(upstream: Server, gateway: Server) -> None:
    """A view's ``bridge.sse(bridge.chat(messages))`` streams the chat answer: the
    upstream gets the messages at /chat/completions, no prompt field."""
    with httpx.Client(timeout=30) as client:
        client.delete(f"{upstream.url}/v1/_requests")
        reply = client.post(
            f"{gateway.url}/chat", json={"messages": [{"role": "user", "content": "Hi"}]}
        )
        [sent] = _received(upstream)
    assert reply.status_code == 200, reply.text
    texts = [
        json.loads(line[6:])["text"]
        for line in reply.text.split("\n")
        if line.startswith('data: {"text')
    ]
    assert "".join(texts) == "Answer 0: hello from the fake upstream."
    assert sent["messages"] == [{"role": "user", "content": "Hi"}]
    assert "prompt" not in sent
