"""The OpenAI gateway: ``/v1`` over :class:`~llmbridge.backends.OpenAIBackend` forwards
whole requests and relays whole answers.

Real processes on 127.0.0.1: the fake upstream (``tests/gateway_upstream.py``, uvicorn),
a Flask gateway under gunicorn and a Quart gateway under uvicorn
(``tests/gateway_apps.py``). Each answer through a gateway is compared field by field
with the answer the upstream gives directly, with the official ``openai`` SDK,
LangChain's ``ChatOpenAI`` and LlamaIndex's ``OpenAILike`` as clients.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from llmbridge import Engine, UpstreamError
from llmbridge.backends import OpenAIBackend, Upstream

from support import PYTHON, Server, free_port, run_server, wait_until

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


# --- An upstream's own errors: relayed 4xx, our key refused, an HTML 404, 429 everywhere ---


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Server, Server]]:
    """Two fake upstreams; their 429s ask to wait 9 and 4 seconds."""
    servers = []
    with contextlib.ExitStack() as stack:
        for name, after in (("a", "9"), ("b", "4")):
            port = free_port()
            args = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
                    "--no-access-log", "gateway_upstream:app"]  # fmt: skip
            env = {"UPSTREAM_NAME": name, "RETRY_AFTER": after}
            servers.append(stack.enter_context(run_server(args, port=port, env=env)))
        yield servers[0], servers[1]


@pytest.fixture(scope="module", params=["flask", "quart"])
def paired(request: pytest.FixtureRequest, pair: tuple[Server, Server]) -> Iterator[Server]:
    """A gateway over both upstreams whose breakers open at the first failure that counts
    (``FAILURES=1``) and close at once (``COOLDOWN=0``): ``/stats`` shows every count."""
    port = free_port()
    if request.param == "flask":
        args = [PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "16", "-w", "1",
                "-b", "127.0.0.1:{port}", "gateway_apps:app"]  # fmt: skip
    else:
        args = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
                "--no-access-log", "gateway_apps:app"]  # fmt: skip
    env = {
        "GATEWAY_APP": request.param,
        "UPSTREAM_URLS": ",".join(f"{u.url}/v1" for u in pair),
        "FAILURES": "1",
        "COOLDOWN": "0",
    }
    with run_server(args, port=port, env=env) as server:
        yield server


def _hits(pair: tuple[Server, Server]) -> list[int]:
    """How many requests each upstream received since the last :func:`_forget`."""
    return [len(_received(u)) for u in pair]


def _forget(pair: tuple[Server, Server]) -> None:
    for u in pair:
        httpx.delete(f"{u.url}/v1/_requests", timeout=10)


def _counters(gateway: Server) -> list[tuple[int, int, int]]:
    stats = httpx.get(f"{gateway.url}/stats", timeout=10).json()
    return [(u["failures"], u["failovers"], u["cooldowns"]) for u in stats["upstreams"]]


def _sdk(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k", max_retries=0, timeout=30)


def _ask(client: openai.OpenAI, marker: str, *, kind: str = "chat", stream: bool = False,
         **extra: Any) -> None:  # fmt: skip
    """One request whose text is ``marker``, read to its end (a stream's too)."""
    if stream:
        extra["stream"] = True
    if kind == "chat":
        messages: Any = [{"role": "user", "content": marker}]
        answer: Any = client.chat.completions.create(model=MODEL, messages=messages, **extra)
    else:
        answer = client.completions.create(model=MODEL, prompt=marker, **extra)
    if stream:
        list(answer)


def _create(client: openai.OpenAI, kind: str, stream: bool) -> None:
    tools = {"tools": [WEATHER]} if kind == "chat" else {}
    _ask(client, "upstream-error:400", kind=kind, stream=stream, **tools)


@pytest.mark.timeout(60)
def test_an_upstream_400_reaches_the_sdk_as_its_own_bad_request(
    pair: tuple[Server, Server], paired: Server
) -> None:
    """An upstream's 400 with an OpenAI error object (an invalid tool schema) arrives as
    ``openai.BadRequestError`` with the upstream's message, type, param and code and no
    other field (what else the upstream put in its body stays behind); chat and
    completions, streamed and not."""
    with _sdk(paired) as client:
        for kind in ("chat", "completion"):
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as info:
                    _create(client, kind, stream)
                error = info.value
                assert error.status_code == 400
                assert error.response.headers["content-type"].startswith("application/json")
                assert error.body == {
                    "message": "Invalid schema for function 'get_weather': 'days' is not valid.",
                    "type": "invalid_request_error",
                    "param": "tools[0].function.parameters",
                    "code": "invalid_function_parameters",
                }
                assert error.param == "tools[0].function.parameters"
                assert error.code == "invalid_function_parameters"
                assert "upstream-secret-trace" not in error.response.text
                assert set(error.response.json()) == {"error"}


@pytest.mark.timeout(60)
def test_other_upstream_4xx_keep_their_status_and_are_capped(
    pair: tuple[Server, Server], paired: Server
) -> None:
    """A 404 (model not found) and a 422 keep their status (the SDK's NotFoundError and
    UnprocessableEntityError); a 5,000-character message or type is cut to 1,000, an
    integer code (llama.cpp's server, vLLM) comes as its digits."""
    messages: Any = [{"role": "user", "content": ""}]
    with _sdk(paired) as client:
        messages[0]["content"] = "upstream-error:404"
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model=MODEL, messages=messages)
        assert missing.value.body == {
            "message": "The model 'nope' does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
        messages[0]["content"] = "upstream-error:422"
        with pytest.raises(openai.UnprocessableEntityError) as unprocessable:
            client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        assert unprocessable.value.body == {
            "message": "max_tokens is too large: 99999.",
            "type": None,
            "param": None,
            "code": None,
        }
        messages[0]["content"] = "upstream-error:400long"
        with pytest.raises(openai.BadRequestError) as long:
            client.chat.completions.create(model=MODEL, messages=messages)
        assert long.value.body == {"message": "x" * 1000, "type": "x" * 1000, "param": None,
                                   "code": "400"}  # fmt: skip


@pytest.mark.timeout(60)
def test_a_relayed_4xx_is_not_an_upstream_failure(
    pair: tuple[Server, Server], paired: Server
) -> None:
    """Six 400s: each reached exactly one upstream (no failover: the same request fails
    everywhere), no breaker counted one (it opens at the first failure here), and both
    upstreams still answer."""
    before = _counters(paired)
    _forget(pair)
    with _sdk(paired) as client:
        for i in range(6):
            with pytest.raises(openai.BadRequestError):
                _create(client, "chat" if i % 2 else "completion", stream=i < 3)
        assert sum(_hits(pair)) == 6
        assert _counters(paired) == before
        _forget(pair)
        for _ in range(2):
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}]
            )
            assert answer.choices[0].message.content == "Answer 0: hello from the fake upstream."
    assert _hits(pair) == [1, 1]  # least outstanding, ties by requests: both served


@pytest.mark.timeout(60)
def test_an_upstream_401_is_a_502_without_its_text(
    pair: tuple[Server, Server], paired: Server
) -> None:
    """Our key refused (401): the client gets a 502 in our words, nothing of the
    upstream's text (it echoes a key fragment); the gateway logs that text at warning
    with the request id. It is the upstream's failure (our key for it is wrong), so the
    request fails over to the other upstream, which refuses too."""
    _forget(pair)
    with _sdk(paired) as client:
        for stream in (False, True):
            rid = f"rid-401-{stream}"
            with pytest.raises(openai.InternalServerError) as info:
                _ask(
                    client, "upstream-error:401", stream=stream, extra_headers={"X-Request-Id": rid}
                )
            response = info.value.response
            assert response.status_code == 502
            assert response.json()["error"]["type"] == "server_error"
            assert "credentials" in response.json()["error"]["message"]
            assert "sk-up" not in response.text
            assert "Incorrect API key" not in response.text
            assert wait_until(
                lambda rid=rid: (
                    f"request {rid}: upstream u1 refused this server's credentials" in paired.log()
                    or f"request {rid}: upstream u0 refused this server's credentials"
                    in paired.log()
                )
            ), paired.log()[-2000:]
            assert "Incorrect API key provided: sk-up****ream." in paired.log()
    assert _hits(pair) == [2, 2]


@pytest.mark.timeout(60)
def test_an_html_404_from_a_wrong_base_url_is_a_502(
    pair: tuple[Server, Server], paired: Server
) -> None:
    """A 404 whose body is not an OpenAI error object (an nginx page: the base URL is
    wrong) is a 502 in our words, streamed and not; nothing of the page reaches the
    client."""
    with _sdk(paired) as client:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                _ask(client, "upstream-error:404html", kind="completion", stream=stream)
            response = info.value.response
            assert response.status_code == 502
            assert response.json()["error"]["message"].startswith("the upstream answered 404")
            assert "nginx" not in response.text
            assert "html" not in response.text


@pytest.mark.timeout(60)
def test_429_from_every_upstream_is_a_429_with_retry_after(
    pair: tuple[Server, Server], paired: Server
) -> None:
    """Both upstreams answer 429 (asking for 9 and 4 seconds): the request tried both
    (failover), and the client gets a 429 (the SDK's RateLimitError) whose Retry-After
    is the sooner of the two; streamed and not."""
    with _sdk(paired) as client:
        for stream in (False, True):
            _forget(pair)
            with pytest.raises(openai.RateLimitError) as info:
                _ask(client, "upstream-error:429", stream=stream)
            response = info.value.response
            assert response.status_code == 429
            assert response.headers["retry-after"] == "4"
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert "sk-up" not in response.text
            assert _hits(pair) == [1, 1]


@pytest.mark.timeout(60)
def test_a_bridge_view_answers_an_upstream_4xx_as_problem_json(
    pair: tuple[Server, Server], paired: Server
) -> None:
    """Outside /v1 (``bridge.sse(bridge.chat(...))`` over OpenAIBackend): the upstream's
    400 is a problem+json 400 whose detail is the upstream's message; its 401 a 502
    problem in our words."""
    with httpx.Client(timeout=30) as client:
        reply = client.post(
            f"{paired.url}/chat",
            json={"messages": [{"role": "user", "content": "upstream-error:400"}]},
        )
        assert reply.status_code == 400, reply.text
        assert reply.headers["content-type"].startswith("application/problem+json")
        problem = reply.json()
        assert (
            problem["detail"] == "Invalid schema for function 'get_weather': 'days' is not valid."
        )
        assert problem["error"] == "UpstreamRejected"
        assert "upstream-secret-trace" not in reply.text
        refused = client.post(
            f"{paired.url}/chat",
            json={"messages": [{"role": "user", "content": "upstream-error:401"}]},
        )
        assert refused.status_code == 502, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "sk-up" not in refused.text


@pytest.mark.timeout(60)
def test_upstreams_cooling_down_after_429s_still_answer_429(pair: tuple[Server, Server]) -> None:
    """When every upstream cools down after its 429s, a request fails at once, and as a
    429 (status 429, retryable, Retry-After the soonest cooldown's end), not as a 502."""
    upstreams = [Upstream(f"{u.url}/v1", name=n) for u, n in zip(pair, "ab", strict=True)]
    backend = OpenAIBackend(upstreams=upstreams, failures=1, cooldown=30.0, model=MODEL)
    throttle = [{"role": "user", "content": "upstream-error:429"}]
    with Engine(backend) as engine:
        with pytest.raises(UpstreamError) as first:
            engine.chat(throttle).result(20)
        assert (first.value.status, first.value.retry_after) == (429, 4.0)
        _forget(pair)
        with pytest.raises(UpstreamError) as cooling:
            engine.chat([{"role": "user", "content": "Hi"}]).result(20)
    assert _hits(pair) == [0, 0]  # nobody was asked: both cool down
    assert cooling.value.status == 429
    assert cooling.value.retryable
    assert cooling.value.retry_after is not None
    assert 25 < cooling.value.retry_after <= 30


@pytest.mark.timeout(60)
def test_a_relayed_4xx_trips_no_policy_breaker_and_is_not_retried(
    pair: tuple[Server, Server],
) -> None:
    """Behind a Pipeline (a circuit breaker that opens at half its calls failing, retries
    before the first token): four upstream 400s are four UpstreamRejected errors, each
    sent once (not retried), and the breaker stays closed; a 500-class failure would
    have opened it."""
    from llmbridge import UpstreamRejected
    from llmbridge.policies import CircuitBreaker, Pipeline, Retry

    upstreams = [Upstream(f"{u.url}/v1", name=n) for u, n in zip(pair, "ab", strict=True)]
    backend = OpenAIBackend(upstreams=upstreams, model=MODEL)
    breaker = CircuitBreaker(failure_ratio=0.5, window=4, min_calls=2, open_for=30)
    _forget(pair)
    with Engine(backend) as engine:
        pipeline = Pipeline(engine, breaker=breaker, retry=Retry(attempts=3, initial=0.01))
        for _ in range(4):
            with pytest.raises(UpstreamRejected) as info:
                pipeline.submit("upstream-error:400").result(20)
            assert info.value.status == 400
            assert info.value.error_object["param"] == "tools[0].function.parameters"
        assert breaker.state == "closed"
        assert sum(_hits(pair)) == 4
        assert pipeline.submit("Hi").result(20).text == "Answer 0: hello from the fake upstream."
