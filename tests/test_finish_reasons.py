"""finish_reason and usage from every kind of backend: ``"length"`` when ``max_tokens``
cut the answer, ``"stop"`` otherwise; prompt tokens when the backend knows them.

Callables wrap the official ``openai`` SDK against the fake upstream process
(``tests/gateway_upstream.py``), returning or yielding the SDK's own objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from llmbridge import Engine
from llmbridge.backends import OpenAIBackend
from llmbridge.policies import BatchBackend
from llmbridge.testing import simulated_engine

from support import PYTHON, Server, free_port, run_server

MESSAGES: Any = [{"role": "user", "content": "hello there"}]
FULL = "Answer 0: hello from the fake upstream."


@pytest.fixture(scope="module")
def upstream() -> Iterator[Server]:
    """The fake upstream (cuts at max_tokens, reports usage)."""
    port = free_port()
    args = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
            "--no-access-log", "gateway_upstream:app"]  # fmt: skip
    with run_server(args, port=port) as server:
        yield server


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=30)


@pytest.mark.timeout(60)
def test_a_callable_returning_the_sdk_response_reports_length_and_usage(upstream: Server) -> None:
    """A sync callable returning a ChatCompletion: 'length' when max_tokens cut it,
    'stop' when not, the upstream's prompt and completion tokens."""
    client = _client(upstream)

    def call(prompt: str, max_new_tokens: int = 100) -> Any:
        return client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=max_new_tokens
        )

    with client, Engine(call) as engine:
        cut = engine.submit("x", max_new_tokens=3).result(30)
        whole = engine.submit("x").result(30)
    assert (cut.text, cut.finish_reason) == ("Answer 0:", "length")
    assert (whole.text, whole.finish_reason) == (FULL, "stop")
    assert cut.completion_tokens == 3
    assert cut.prompt_tokens == whole.prompt_tokens == 5  # the upstream's count


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_an_async_generator_yielding_sdk_chunks_reports_length_and_usage(
    upstream: Server,
) -> None:
    """An async generator yielding the SDK's stream chunks (usage included)."""
    client = openai.AsyncOpenAI(base_url=f"{upstream.url}/v1", api_key="k", max_retries=0)

    async def call(prompt: str, max_new_tokens: int = 100) -> Any:
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=max_new_tokens, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            yield chunk

    async with Engine(call) as engine:
        cut = await engine.submit("x", max_new_tokens=4).aresult(30)
        whole = await engine.submit("x").aresult(30)
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("Answer 0: hello", "length", 4)
    assert (whole.text, whole.finish_reason) == (FULL, "stop")
    assert whole.prompt_tokens == 5


@pytest.mark.timeout(30)
def test_plain_objects_and_strings() -> None:
    """Any object with finish_reason / usage fields, or a dict, counts; plain strings
    finish 'stop' with no prompt tokens (documented: the engine can't know)."""

    class Piece:
        def __init__(self, text: str, finish_reason: str | None = None) -> None:
            self.text = text
            self.finish_reason = finish_reason

    def pieces(prompt: str) -> Any:
        yield Piece("ab")
        yield Piece("cd", "length")

    with Engine(pieces) as engine:
        done = engine.submit("x").result(10)
    assert (done.text, done.finish_reason) == ("abcd", "length")
    with Engine(lambda p: {"text": "hi", "finish_reason": "length", "prompt_tokens": 7}) as engine:
        done = engine.submit("x").result(10)
    assert (done.text, done.finish_reason, done.prompt_tokens) == ("hi", "length", 7)
    with Engine(lambda p: "plain") as engine:
        done = engine.submit("x").result(10)
    assert (done.finish_reason, done.prompt_tokens) == ("stop", 0)
    with Engine(lambda p: 42) as engine, pytest.raises(Exception, match="expected str or chunks"):
        engine.submit("x").result(10)


@pytest.mark.timeout(30)
def test_batch_results_carry_finish_reasons() -> None:
    """A BatchBackend result may say how each answer ended."""

    def batch(requests: list[Any]) -> list[Any]:
        return [
            {"text": r.prompt[: r.params["max_new_tokens"]], "finish_reason": "length"}
            if len(r.prompt) > r.params["max_new_tokens"]
            else r.prompt
            for r in requests
        ]

    with Engine(BatchBackend(batch)) as engine:
        cut = engine.submit("abcdef", max_new_tokens=3).result(10)
        whole = engine.submit("ab", max_new_tokens=3).result(10)
    assert (cut.text, cut.finish_reason) == ("abc", "length")
    assert (whole.text, whole.finish_reason) == ("ab", "stop")


@pytest.mark.timeout(60)
def test_step_and_http_backends(upstream: Server) -> None:
    """The step generator and OpenAIBackend (streamed and not) say 'length' for a cut
    answer and 'stop' otherwise, with the upstream's prompt tokens."""
    with simulated_engine(max_new_tokens=50) as engine:
        assert engine.submit("p", max_new_tokens=3).result(10).finish_reason == "length"
    for stream in (True, False):
        with Engine(OpenAIBackend(f"{upstream.url}/v1", model="m", stream=stream)) as engine:
            cut = engine.chat(MESSAGES, max_new_tokens=2).result(30)
            whole = engine.chat(MESSAGES).result(30)
        assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("Answer 0", "length", 2)
        assert (whole.text, whole.finish_reason) == (FULL, "stop")
        assert whole.prompt_tokens == 5
