"""The OpenAI-compatible blueprints, served by real servers, driven by the official SDK.

The Flask blueprint runs under werkzeug's threaded server, the Quart blueprint under
hypercorn, each in a subprocess over a simulated engine. The simulated text is a pure
function of prompt, length and seed, so every answer is checked exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest

from llmbridge.openai import render_messages
from llmbridge.testing import SimulatedGenerator

from support import PYTHON, Server, free_port, run_server

EXPECTED = SimulatedGenerator()  # same vocabulary as the servers' generators


def _expected(prompt: str, max_tokens: int, seed: int | None = None) -> str:
    return EXPECTED.expected_text(prompt, max_tokens, seed)


@pytest.fixture(scope="module", params=["flask", "quart"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """The Flask blueprint under werkzeug, then the Quart blueprint under hypercorn."""
    port = free_port()
    if request.param == "flask":
        args = [PYTHON, "tests/openai_apps.py"]
    else:
        args = [PYTHON, "-m", "hypercorn", "--bind", "127.0.0.1:{port}", "openai_apps:app"]
    with run_server(args, port=port, env={"OPENAI_APP": request.param, "PORT": str(port)}) as s:
        yield s


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _aclient(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.timeout(60)
def test_models_list_and_retrieve(server: Server) -> None:
    """/v1/models lists the served models; an unknown one is a 404 NotFoundError."""
    with _client(server) as client:
        assert [m.id for m in client.models.list()] == ["sim", "sim-2"]
        assert client.models.retrieve("sim-2").id == "sim-2"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nope")


@pytest.mark.timeout(60)
def test_chat_completion_sync(server: Server) -> None:
    """A non-streamed chat completion carries exactly the model's text and usage."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]
    with _client(server) as client:
        answer = client.chat.completions.create(
            model="sim", messages=messages, max_tokens=7, seed=3
        )
    assert answer.object == "chat.completion"
    assert answer.model == "sim"
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == _expected(render_messages(messages), 7, 3)
    assert choice.finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 7


@pytest.mark.timeout(60)
def test_chat_completion_stream_sync_with_usage(server: Server) -> None:
    """A streamed chat completion: role first, exact deltas, finish, then usage, then [DONE]."""
    messages = [{"role": "user", "content": "stream please"}]
    with _client(server) as client:
        chunks = list(
            client.chat.completions.create(
                model="sim",
                messages=messages,
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected(render_messages(messages), 12)
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.timeout(60)
def test_completion_sync_stream_and_not(server: Server) -> None:
    """/v1/completions, whole and streamed (without usage), both exact."""
    with _client(server) as client:
        whole = client.completions.create(model="sim", prompt="Once upon", max_tokens=9)
        streamed = client.completions.create(
            model="sim", prompt="Once upon", max_tokens=9, stream=True
        )
        chunks = list(streamed)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == _expected("Once upon", 9)
    assert "".join(c.choices[0].text for c in chunks) == _expected("Once upon", 9)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_async_client_many_concurrent_streams_each_exact(server: Server) -> None:
    """40 concurrent streams (chat and completions) from the async SDK each get their own text."""

    async def chat(client: openai.AsyncOpenAI, i: int) -> None:
        messages = [{"role": "user", "content": f"question number {i}"}]
        stream = await client.chat.completions.create(
            model="sim", messages=messages, max_tokens=5 + i % 11, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == _expected(render_messages(messages), 5 + i % 11)

    async def complete(client: openai.AsyncOpenAI, i: int) -> None:
        answer = await client.completions.create(
            model="sim-2", prompt=f"prompt {i}", max_tokens=3 + i % 7, seed=i
        )
        assert answer.choices[0].text == _expected(f"prompt {i}", 3 + i % 7, i)

    async with _aclient(server) as client:
        await asyncio.gather(
            *(chat(client, i) if i % 2 else complete(client, i) for i in range(40))
        )


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_async_client_chat_stream_with_usage(server: Server) -> None:
    """The async SDK reads a streamed chat answer with usage in its last chunk."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "parts work too"}]}]
    async with _aclient(server) as client:
        stream = await client.chat.completions.create(
            model="sim",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected(render_messages(messages), 6)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens >= 6


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "missing_required_parameter"),
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, "model", None),
        ({"model": "sim"}, "messages", "missing_required_parameter"),
        ({"model": "sim", "messages": []}, "messages", "empty_array"),
        ({"model": "sim", "messages": "hi"}, "messages", "invalid_type"),
        ({"model": "sim", "messages": [{"content": "x"}]}, "messages[0].role", None),
        ({"model": "sim", "messages": [{"role": "wizard", "content": "x"}]}, None, None),
        ({"model": "sim", "messages": [{"role": "user", "content": 5}]}, None, "invalid_type"),
        ({"model": "sim", "messages": [{"role": "user", "content": "x" * 5000}]}, None, None),
        (
            {"model": "sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
            "max_tokens",
            "invalid_type",
        ),
        (
            {"model": "sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
            "invalid_value",
        ),
        (
            {"model": "sim", "messages": [{"role": "user", "content": "x"}], "temperature": 7},
            "temperature",
            "invalid_value",
        ),
        (
            {"model": "sim", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "stream",
            "invalid_type",
        ),
        ({"model": "sim", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n", None),
        (
            {"model": "sim", "messages": [{"role": "user", "content": "x"}], "stop": [1]},
            "stop",
            None,
        ),
    ],
)
@pytest.mark.timeout(30)
def test_bad_chat_requests_are_openai_shaped_400s(
    server: Server, body: dict[str, object], param: str | None, code: str | None
) -> None:
    """Each invalid chat request is a 400 the SDK raises as BadRequestError, with a message."""
    with _client(server) as client, pytest.raises(openai.BadRequestError) as info:
        client.post("/chat/completions", body=body, cast_to=httpx.Response)
    error = info.value
    assert error.status_code == 400
    assert isinstance(error.body, dict)
    assert error.body["type"] == "invalid_request_error"
    assert isinstance(error.body["message"], str)
    assert len(error.body["message"]) > 10
    assert {"message", "type", "param", "code"} <= error.body.keys()
    if param is not None:
        assert error.body["param"] == param
    if code is not None:
        assert error.body["code"] == code


@pytest.mark.timeout(30)
def test_malformed_bodies_and_methods(server: Server) -> None:
    """Not JSON, a JSON array, an over-long prompt, a wrong method: all JSON errors, never HTML."""
    with httpx.Client(base_url=f"{server.url}/v1", timeout=20) as http:
        cases = [
            http.post(
                "/chat/completions",
                content=b"{not json",
                headers={"content-type": "application/json"},
            ),
            http.post("/completions", json=["a", "b"]),
            http.post("/completions", json={"model": "sim", "prompt": "x" * 4001}),
            http.post("/completions", json={"model": "sim", "prompt": ""}),
            http.post("/completions", json={"model": "sim", "prompt": [1, 2, 3]}),
        ]
        for response in cases:
            assert response.status_code == 400, response.text
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["error"]["type"] == "invalid_request_error"
        long = cases[2].json()["error"]
        assert long["code"] == "context_length_exceeded"
        assert "4001" in long["message"]
        wrong = http.get("/chat/completions")
        assert wrong.status_code == 405
        assert wrong.json()["error"]["code"] == "method_not_allowed"
