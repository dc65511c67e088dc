"""The OpenAI-compatible blueprints, served by real servers, driven by the official SDK.

The Flask blueprint runs under werkzeug's threaded server, the Quart blueprint under
hypercorn, each in a subprocess over a simulated engine. The simulated text is a pure
function of prompt, length and seed, so every answer is checked exactly.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai_servers import serve

from llmbridge._sansio.sse import SSEDecoder
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


# -- one stream path: threads, deadlines, drain, JSON errors (real servers) -----------


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads: line")


@pytest.mark.anyio
@pytest.mark.timeout(150)
async def test_200_flask_v1_streams_under_to_asgi_hold_a_bounded_number_of_threads() -> None:
    """200 concurrent /v1 streams on the Flask blueprint under uvicorn + to_asgi all run at
    once (each has its first chunk while the others are still open) on at most a handful
    of threads: the adapter pumps them on its loop instead of 8 worker threads."""
    env = {"SIM_STEP_TIME": "0.02", "SIM_MAX_TOKENS": "512", "SIM_BATCH": "256"}
    streams = 200
    with serve("uvicorn", env) as server:
        started = 0
        all_started = asyncio.Event()
        release = asyncio.Event()
        limits = httpx.Limits(max_connections=streams + 10)

        async def one(client: httpx.AsyncClient, i: int) -> None:
            nonlocal started
            body = {"model": "sim", "prompt": f"p{i}", "max_tokens": 500, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                # Keep the iterator referenced: a dropped one is finalized, and that
                # closes the connection (the server would see the client leave).
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data:"):
                        break
                started += 1
                if started == streams:
                    all_started.set()
                await release.wait()

        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            tasks = [asyncio.ensure_future(one(client, i)) for i in range(streams)]
            try:
                await asyncio.wait_for(all_started.wait(), 60)
                threads = _threads(server.proc.pid)
            finally:
                release.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    assert started == streams
    # 8 adapter workers, the engine, the background loop, uvicorn's: not one per stream.
    assert threads <= 20, threads


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_100_flask_v1_whole_answers_under_to_asgi_share_one_thread() -> None:
    """100 concurrent non-streamed requests from the openai SDK to the Flask blueprint
    under uvicorn + to_asgi with a single adapter thread: each answer is exact. A thread
    held per whole answer would serve them one after another (100 x 0.6 s, past the
    client's 15 s timeout); the adapter awaits them on its loop."""
    env = {"SIM_STEP_TIME": "0.02", "SIM_MAX_TOKENS": "512", "SIM_BATCH": "128"}
    with serve("uvicorn", {**env, "ASGI_WORKERS": "1"}) as server:
        client = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1",
            api_key="unused",
            max_retries=0,
            timeout=15,
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=110)),
        )
        async with client:
            answers = await asyncio.gather(
                *(
                    client.completions.create(model="sim", prompt=f"w{i}", max_tokens=30)
                    for i in range(100)
                )
            )
            threads = _threads(server.proc.pid)
    for i, answer in enumerate(answers):
        assert answer.choices[0].text == _expected(f"w{i}", 30)
        assert answer.choices[0].finish_reason == "length"
    assert threads <= 20, threads


@pytest.fixture(scope="module", params=["werkzeug", "uvicorn", "hypercorn"])
def never_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """Each integration over a backend that never answers, with a 0.5 s start timeout."""
    env = {"OPENAI_BACKEND": "never", "OPENAI_START_TIMEOUT": "0.5"}
    with serve(request.param, env) as server:
        yield server


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.timeout(60)
def test_a_backend_that_never_answers_gets_an_openai_shaped_504(
    never_server: Server, stream: bool
) -> None:
    """No output within start_timeout: 504 with OpenAI's error body, streamed or not, on
    werkzeug, uvicorn + to_asgi and hypercorn (no thread or task waits forever)."""
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with httpx.Client(base_url=never_server.url, timeout=20) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 504, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert error["code"] == "timeout"


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn", "hypercorn+bridge"])
@pytest.mark.timeout(90)
def test_sigterm_mid_stream_ends_v1_streams_with_a_final_event_and_a_clean_end(
    kind: str,
) -> None:
    """SIGTERM while /v1 streams run: each ends, within the drain timeout, with a final
    error event and a properly terminated body; then the server exits. Flask under
    uvicorn + to_asgi (the adapter's drain), Quart under hypercorn (the blueprint's own
    drain, or a QuartBridge's when the app has one)."""
    env = {"SIM_STEP_TIME": "0.05", "SIM_MAX_TOKENS": "512", "DRAIN_TIMEOUT": "1"}
    if kind == "hypercorn+bridge":
        kind, env["QUART_BRIDGE"] = "hypercorn", "1"
    body = {"model": "sim", "prompt": "drain me", "max_tokens": 500, "stream": True}
    with serve(kind, env) as server, httpx.Client(base_url=server.url, timeout=20) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            decoder = SSEDecoder()
            events = []
            lines = response.iter_bytes()
            while len(events) < 3:
                events += decoder.feed(next(lines))
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            for piece in lines:  # raises RemoteProtocolError if the body is cut
                events += decoder.feed(piece)
            ended = time.monotonic()
        assert server.proc.wait(30) is not None
    assert events[-1].data != "[DONE]", "the stream ran to its end: it was not drained"
    last = events[-1].json()
    assert last["error"]["code"] == "engine_closed", last
    assert all("choices" in event.json() for event in events[:-1])
    # Not the 25 s the generation would take: the drain ended it (loose bound, no speed
    # assert: it only tells drained from not drained).
    assert ended - signalled < 15


@pytest.mark.parametrize("path", ["", "/", "/nope", "/chat", "/models/sim/extra/x", "/embeddings"])
@pytest.mark.timeout(30)
def test_unknown_v1_urls_are_openai_shaped_404s(server: Server, path: str) -> None:
    """Any URL under /v1 that isn't a route: a JSON 404, not the framework's HTML page."""
    with httpx.Client(base_url=server.url, timeout=20) as http:
        for method in ("GET", "POST", "DELETE"):
            response = http.request(method, f"/v1{path}")
            if path == "/models/sim/extra/x" and method == "GET":
                assert response.status_code == 404  # no model by that name
            assert response.status_code in (404, 405), (method, path, response.text)
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.timeout(60)
def test_bodies_over_the_limit_are_openai_shaped_413s(server: Server, chunked: bool) -> None:
    """A body over Settings.max_body_bytes (1 MiB) is a JSON 413, declared or chunked."""
    big = b'{"model": "sim", "prompt": "' + b"x" * (3 << 20) + b'"}'
    content: object = big
    if chunked:
        content = (big[i : i + 65536] for i in range(0, len(big), 65536))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.post(
            "/v1/completions", content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == 413, response.text[:200]
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "request_too_large"


@pytest.mark.timeout(30)
def test_deep_nesting_and_lone_surrogates_are_400s(server: Server) -> None:
    """1,000+ levels of nesting, and a lone surrogate in model or content: JSON 400s (not
    a RecursionError 500, not an echo that can't be encoded, not a 502)."""
    deep = b'{"model": "sim", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    cases = [
        b"[" * 100_000 + b"]" * 100_000,
        deep,
        b'{"model": "\\ud800", "prompt": "x"}',
        b'{"model": "sim", "prompt": "a\\udfffb"}',
        b'{"model": "sim", "messages": [{"role": "user", "content": "\\ud800"}]}',
    ]
    with httpx.Client(base_url=f"{server.url}/v1", timeout=20) as http:
        for i, raw in enumerate(cases):
            path = "/chat/completions" if b"messages" in raw else "/completions"
            response = http.post(path, content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 400, (i, response.text[:200])
            assert response.json()["error"]["type"] == "invalid_request_error"
        # A valid surrogate pair is ordinary text.
        pair = b'{"model": "sim", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
        ok = http.post("/completions", content=pair, headers={"content-type": "application/json"})
        assert ok.status_code == 200, ok.text


@pytest.mark.timeout(30)
def test_a_valid_client_request_id_names_the_request_end_to_end(server: Server) -> None:
    """A valid X-Request-Id is the engine request's id, echoed on whole and streamed
    answers; an invalid one is replaced, never echoed."""
    body = {"model": "sim", "prompt": "ids", "max_tokens": 2}
    with httpx.Client(base_url=f"{server.url}/v1", timeout=20) as http:
        for stream in (False, True):
            ok = http.post(
                "/completions", json={**body, "stream": stream}, headers={"X-Request-Id": "ab-1.c"}
            )
            assert ok.status_code == 200
            assert ok.headers["x-request-id"] == "ab-1.c"
        bad = http.post("/completions", json=body, headers={"X-Request-Id": "no spaces<>"})
        assert bad.status_code == 200
        assert bad.headers["x-request-id"] not in ("", "no spaces<>")
