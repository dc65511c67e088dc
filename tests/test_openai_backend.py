"""OpenAIBackend against real upstreams on 127.0.0.1.

Two upstreams: llmbridge's own Quart blueprint over a SimulatedGenerator under hypercorn
(exact text, end to end), and a tiny raw-asyncio HTTP server written here that fails on
purpose (500, 429, a dropped connection, a stream without its end) and records when each
client connection closes, so cancellation is observed on the upstream's side.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio.from_thread
import openai
import pytest

from llmbridge import BadRequest, Engine, Timeout, UpstreamError
from llmbridge.backends import OpenAIBackend
from llmbridge.openai import render_messages
from llmbridge.testing import SimulatedGenerator

from support import PYTHON, RawUpstream, Server, free_port, read_http_body, run_server

EXPECTED = SimulatedGenerator()


@dataclass
class TinyUpstream(RawUpstream):
    """A deliberately small HTTP/1.1 server: the request's prompt (or last message) picks
    its behaviour, ``mode:<name>:<tag>``; ``closed[tag]`` is when that connection closed."""

    closed: dict[str, float] = field(default_factory=dict)
    events: dict[str, threading.Event] = field(default_factory=dict)

    def closed_event(self, tag: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault(tag, threading.Event())

    def _record_close(self, tag: str) -> None:
        when = time.monotonic()
        with self.lock:
            self.closed.setdefault(tag, when)
            event = self.events.setdefault(tag, threading.Event())
        event.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tag = "?"
        with self.connection():
            try:
                body = json.loads(await read_http_body(reader))
                marker = body.get("prompt") or body["messages"][-1]["content"]
                _, mode, tag = marker.split(":", 2)
                await self.respond(mode, tag, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
        self._record_close(tag)

    async def respond(
        self, mode: str, tag: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if mode in ("500", "429") or mode.startswith("429="):
            # 429=<value>: a 429 whose Retry-After is <value> (inf, 1e999, ...).
            status, _, after = mode.partition("=")
            payload = json.dumps({"error": {"message": f"upstream says {status}"}}).encode()
            extra = f"Retry-After: {after or 3}\r\n".encode() if status == "429" else b""
            writer.write(
                f"HTTP/1.1 {status} Oops\r\nContent-Type: application/json\r\n".encode()
                + extra
                + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )

        def chunk(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        def event(text: str, finish: str | None = None) -> bytes:
            choice = {"index": 0, "text": text, "finish_reason": finish}
            return chunk(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())

        if mode == "drop":
            writer.write(event("one ") + event("two "))
            await writer.drain()
            writer.transport.abort()  # mid-body, no terminating chunk
            return
        if mode == "truncated":
            writer.write(event("one ") + chunk(b'data: {"choices": []}\n\n') + b"0\r\n\r\n")
            await writer.drain()
            return
        if mode == "fast":
            await asyncio.sleep(0.02)
            writer.write(event(tag, "stop") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
            return
        assert mode == "slow", mode
        eof = asyncio.ensure_future(reader.read(1))  # b"" the moment the client closes
        try:
            for i in range(1000):  # bounded: 20 s at most
                writer.write(event(f"t{i} "))
                await writer.drain()
                done, _ = await asyncio.wait({eof}, timeout=0.02)
                if done:
                    return
        finally:
            eof.cancel()


@pytest.fixture(scope="module")
def tiny() -> Iterator[TinyUpstream]:
    """The tiny failing upstream, on a loop in a thread of this process."""
    with TinyUpstream().running() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[Server]:
    """llmbridge's own Quart blueprint over a SimulatedGenerator, under hypercorn."""
    port = free_port()
    args = [PYTHON, "-m", "hypercorn", "--bind", "127.0.0.1:{port}", "openai_apps:app"]
    with run_server(args, port=port, env={"OPENAI_APP": "quart"}) as server:
        yield server


def _backend(url: str, **options: object) -> OpenAIBackend:
    return OpenAIBackend(f"{url}/v1" if "/v1" not in url else url, model="sim", **options)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_streams_exact_text_from_quart_upstream(upstream: Server) -> None:
    """Completions and chat, streamed upstream, come back exact with usage and finish."""
    with Engine(_backend(upstream.url)) as engine:
        done = engine.submit("the prompt", max_new_tokens=9, seed=4).result(30)
        messages = [{"role": "user", "content": "hi"}]
        chat = engine.submit("ignored", messages=messages, max_new_tokens=5).result(30)
    assert done.text == EXPECTED.expected_text("the prompt", 9, 4)
    assert done.finish_reason == "length"
    assert done.completion_tokens == 9
    assert done.prompt_tokens == 2
    assert chat.text == EXPECTED.expected_text(render_messages(messages), 5)


@pytest.mark.timeout(60)
def test_whole_answers_when_not_streaming(upstream: Server) -> None:
    """stream=False asks the upstream for whole answers: same text, same usage."""
    with Engine(_backend(upstream.url, stream=False)) as engine:
        done = engine.submit("whole", max_new_tokens=6).result(30)
    assert done.text == EXPECTED.expected_text("whole", 6)
    assert done.completion_tokens == 6
    assert done.finish_reason == "length"


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_one_pooled_client_serves_threads_and_coroutines(upstream: Server) -> None:
    """60 requests from coroutines and threads share one client on the engine loop."""
    backend = _backend(upstream.url, max_connections=8)
    async with Engine(backend) as engine:
        clients: set[int] = set()

        async def one(i: int) -> None:
            stream = engine.submit(f"async {i}", max_new_tokens=4 + i % 5)
            text = "".join([chunk async for chunk in stream])
            assert text == EXPECTED.expected_text(f"async {i}", 4 + i % 5)
            clients.add(id(backend.client))

        def threaded(i: int) -> None:
            done = engine.submit(f"thread {i}", max_new_tokens=3).result(60)
            assert done.text == EXPECTED.expected_text(f"thread {i}", 3)
            clients.add(id(backend.client))

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(one, i)
                tg.start_soon(anyio.to_thread.run_sync, threaded, i)
    assert len(clients) == 1
    assert id(None) not in clients
    assert backend.client is None  # closed with the engine


@pytest.mark.timeout(60)
def test_connection_limit_is_respected(tiny: TinyUpstream) -> None:
    """max_connections=3 keeps at most 3 upstream connections open for 24 requests."""
    with Engine(_backend(tiny.url, max_connections=3)) as engine:
        streams = [engine.submit(f"mode:fast:pool{i}") for i in range(24)]
        texts = [s.result(30).text for s in streams]
    assert texts == [f"pool{i}" for i in range(24)]
    assert 1 <= tiny.peak <= 3


@pytest.mark.parametrize(("mode", "status"), [("500", 500), ("429", 429)])
@pytest.mark.timeout(30)
def test_upstream_error_status_is_retryable_upstream_error(
    tiny: TinyUpstream, mode: str, status: int
) -> None:
    """500 and 429 fail the request with a clear, retryable UpstreamError."""
    with Engine(_backend(tiny.url)) as engine:
        stream = engine.submit(f"mode:{mode}:status{mode}")
        with pytest.raises(UpstreamError) as info:
            stream.result(20)
    error = info.value
    assert error.upstream_status == status
    assert error.retryable
    assert f"upstream says {mode}" in error.message
    assert error.retry_after == (3.0 if mode == "429" else None)


@pytest.mark.parametrize("mode", ["drop", "truncated"])
@pytest.mark.timeout(30)
def test_broken_streams_fail_clearly_after_their_text(tiny: TinyUpstream, mode: str) -> None:
    """A connection dropped mid-stream, or a stream ending without [DONE], is an error."""
    with Engine(_backend(tiny.url)) as engine:
        stream = engine.submit(f"mode:{mode}:broken-{mode}")
        chunks: list[str] = []
        with pytest.raises(UpstreamError) as info:
            chunks.extend(stream)
    assert "".join(chunks).startswith("one ")
    assert info.value.retryable
    assert info.value.upstream_status is None


@pytest.mark.timeout(30)
def test_unreachable_upstream_and_read_timeout(tiny: TinyUpstream) -> None:
    """Nothing listening is a retryable UpstreamError; a silent upstream is a Timeout."""
    nowhere = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1")
    with Engine(nowhere) as engine, pytest.raises(UpstreamError, match="connection failed"):
        engine.submit("x").result(20)
    # 'fast' waits 20 ms before its first byte: longer than a 10 ms read timeout.
    with Engine(_backend(tiny.url, timeout=0.01)) as engine, pytest.raises(Timeout):
        engine.submit("mode:fast:timeout").result(20)


@pytest.mark.timeout(60)
def test_cancel_closes_the_upstream_connection_within_100ms(tiny: TinyUpstream) -> None:
    """Cancelling a stream closes its upstream connection at once, seen by the upstream."""
    delays: list[float] = []
    with Engine(_backend(tiny.url)) as engine:
        for i in range(7):
            tag = f"cancel{i}"
            stream = engine.submit(f"mode:slow:{tag}")
            stream.wait_started(10)
            assert not tiny.closed_event(tag).is_set()
            cancelled_at = time.monotonic()
            stream.cancel()
            assert tiny.closed_event(tag).wait(5), "the upstream never saw the disconnect"
            delays.append(tiny.closed[tag] - cancelled_at)
    # The median keeps one scheduling hiccup on a loaded machine from deciding the test.
    assert statistics.median(delays) < 0.1, delays
    assert max(delays) < 2.0, delays


@pytest.fixture(scope="module")
def chain(upstream: Server) -> Iterator[Server]:
    """A Flask app (gunicorn, gthread) whose engine's backend is OpenAIBackend -> upstream."""
    port = free_port()
    args = [
        PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "32", "-w", "1",
        "-b", "127.0.0.1:{port}", "openai_apps:app",
    ]  # fmt: skip
    env = {"OPENAI_APP": "chain", "UPSTREAM_URL": f"{upstream.url}/v1"}
    with run_server(args, port=port, env=env) as server:
        yield server


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_chained_flask_to_quart_many_concurrent_streams_exact(chain: Server) -> None:
    """SDK -> Flask (OpenAIBackend) -> Quart blueprint -> simulated model: 48 streams, exact."""

    async def chat(client: openai.AsyncOpenAI, i: int) -> None:
        messages = [{"role": "user", "content": f"chained {i}"}]
        stream = await client.chat.completions.create(
            model="sim",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=4 + i % 9,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == EXPECTED.expected_text(render_messages(messages), 4 + i % 9, i)
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 4 + i % 9

    async def complete(client: openai.AsyncOpenAI, i: int) -> None:
        answer = await client.completions.create(model="sim", prompt=f"c{i}", max_tokens=5)
        assert answer.choices[0].text == EXPECTED.expected_text(f"c{i}", 5)

    async with openai.AsyncOpenAI(
        base_url=f"{chain.url}/v1", api_key="k", max_retries=0, timeout=60
    ) as client:
        await asyncio.gather(*(chat(client, i) for i in range(40)))
        await asyncio.gather(*(complete(client, i) for i in range(8)))


@pytest.fixture(scope="module")
def chain_to_tiny(tiny: TinyUpstream) -> Iterator[Server]:
    """The same Flask app (werkzeug, threaded) in front of the tiny failing upstream."""
    port = free_port()
    env = {"OPENAI_APP": "chain", "UPSTREAM_URL": f"{tiny.url}/v1", "PORT": str(port)}
    with run_server([PYTHON, "tests/openai_apps.py"], port=port, env=env) as server:
        yield server


@pytest.mark.timeout(60)
def test_chained_upstream_errors_reach_the_sdk_clearly(chain_to_tiny: Server) -> None:
    """Through Flask: an upstream 500 becomes a 502 error body, its 429 a 429 with its
    Retry-After (the client should slow down); a drop mid-stream an APIError."""
    with openai.OpenAI(
        base_url=f"{chain_to_tiny.url}/v1", api_key="k", max_retries=0, timeout=30
    ) as client:
        for mode, error, status in (
            ("500", openai.InternalServerError, 502),
            ("429", openai.RateLimitError, 429),
        ):
            with pytest.raises(error) as info:
                client.completions.create(model="sim", prompt=f"mode:{mode}:chain{mode}")
            assert info.value.status_code == status
            assert f"upstream answered {mode}" in info.value.message
            if mode == "429":
                assert info.value.response.headers["retry-after"] == "3"
        stream = client.completions.create(model="sim", prompt="mode:drop:chaindrop", stream=True)
        texts: list[str] = []
        with pytest.raises(openai.APIError, match="upstream connection failed"):
            texts.extend(chunk.choices[0].text for chunk in stream)
        assert "".join(texts).startswith("one ")


@pytest.mark.parametrize("after", ["inf", "1e999", "-inf", "nan", "1e308"])
@pytest.mark.timeout(60)
def test_an_upstream_retry_after_of_inf_is_clamped_end_to_end(
    chain_to_tiny: Server, after: str
) -> None:
    """An upstream 429 with Retry-After inf / 1e999 / nan: through OpenAIBackend and the
    Flask blueprint the client gets a JSON 429 with a finite Retry-After (or none), not
    an OverflowError 500; streamed and not."""
    with openai.OpenAI(
        base_url=f"{chain_to_tiny.url}/v1", api_key="k", max_retries=0, timeout=30
    ) as client:
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as info:
                client.completions.create(
                    model="sim", prompt=f"mode:429={after}:ra{after}{stream}", stream=stream
                )
            response = info.value.response
            assert response.status_code == 429
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["error"]["type"] == "rate_limit_error"
            value = response.headers.get("retry-after")
            if after in ("-inf", "nan"):
                assert value in (None, "0"), value
            else:
                assert value == "86400", value


@pytest.mark.timeout(60)
def test_client_leaving_a_chained_stream_closes_the_upstream(
    chain_to_tiny: Server, tiny: TinyUpstream
) -> None:
    """An SDK client closing its stream through Flask closes the upstream connection."""
    with openai.OpenAI(
        base_url=f"{chain_to_tiny.url}/v1", api_key="k", max_retries=0, timeout=30
    ) as client:
        stream = client.completions.create(model="sim", prompt="mode:slow:leave", stream=True)
        for n, _ in enumerate(stream):
            if n == 3:
                break
        left_at = time.monotonic()
        stream.close()
        assert tiny.closed_event("leave").wait(10), "the upstream never saw the client go"
    # Flask notices on its next write (the upstream sends every 20 ms): bounded, not exact.
    assert tiny.closed["leave"] - left_at < 2.0


@pytest.mark.timeout(60)
def test_backends_and_openai_modules_import_nothing_heavy() -> None:
    """Importing llmbridge.backends / llmbridge.openai loads no aiohttp, httpx, torch, transformers,
    flask or quart; touching an adapter loads only its own dependency."""
    import subprocess

    code = (
        "import sys, llmbridge, llmbridge.backends, llmbridge.openai\n"
        "heavy = {'aiohttp', 'httpx', 'torch', 'transformers', 'flask', 'quart'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
        "llmbridge.backends.ExLlamaV2Adapter, llmbridge.backends.LlamaCppBackend\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
        "llmbridge.backends.OpenAIBackend\n"
        "assert 'aiohttp' in sys.modules and 'torch' not in sys.modules\n"
    )
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr


@pytest.mark.timeout(90)
def test_many_streams_start_at_once_with_the_default_limits(tiny: TinyUpstream) -> None:
    """120 concurrent streams, more than an HTTP client's usual pool of 100 connections, all
    reach the upstream at once: the pool is sized from max_concurrency (256), keeps as
    many alive, and the limits and the streams in flight are in ``backend.stats``."""
    backend = _backend(tiny.url)
    with Engine(backend) as engine:
        streams = [engine.submit(f"mode:slow:many{i}") for i in range(120)]
        for stream in streams:
            stream.wait_started(30)
        open_now, stats = tiny.open_now, backend.stats
        for stream in streams:
            stream.close()
    assert open_now >= 120
    assert stats["in_flight"] == 120
    assert stats["max_concurrency"] == stats["max_connections"] == 256
    assert stats["upstreams"][0]["outstanding"] == 120


@pytest.mark.timeout(60)
def test_engine_chat_needs_no_dummy_prompt(upstream: Server) -> None:
    """``engine.chat(messages)`` goes to /chat/completions over OpenAIBackend, and gives
    a local backend the messages rendered by the default template as its prompt."""
    messages = [{"role": "user", "content": "hi"}]
    with Engine(_backend(upstream.url)) as engine:
        done = engine.chat(messages, max_new_tokens=5).result(30)
    assert done.text == EXPECTED.expected_text(render_messages(messages), 5)
    seen: list[tuple[str, list[dict[str, str]]]] = []
    with Engine(lambda prompt, messages: seen.append((prompt, messages)) or "ok") as engine:
        assert engine.chat(messages).result(10).text == "ok"
        with pytest.raises(BadRequest):
            engine.chat("not a list")  # type: ignore[arg-type]
    assert seen == [(render_messages(messages), messages)]


@dataclass
class RecordingProxy(RawUpstream):
    """A forward proxy's first line of each request (``POST http://host/... HTTP/1.1``),
    answered here with one whole chat completion."""

    lines: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.connection():
            head = await reader.readuntil(b"\r\n\r\n")
            with self.lock:
                self.lines.append(head.split(b"\r\n", 1)[0].decode())
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            answer = {"choices": [{"index": 0, "message": {"content": "via proxy"}}]}
            payload = json.dumps(answer).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            writer.close()


@pytest.mark.timeout(30)
def test_the_proxy_variables_are_honoured(
    monkeypatch: pytest.MonkeyPatch, upstream: Server
) -> None:
    """``HTTP_PROXY`` sends the call through the proxy (an absolute URI, as a forward
    proxy expects); ``NO_PROXY`` keeps a host away from it."""
    with RecordingProxy().running() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with Engine(_backend("http://llm.internal:8000/v1", stream=False)) as engine:
            done = engine.chat([{"role": "user", "content": "hi"}]).result(20)
        assert done.text == "via proxy"
        assert proxy.lines == ["POST http://llm.internal:8000/v1/chat/completions HTTP/1.1"]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        with Engine(_backend(upstream.url, stream=False)) as engine:
            done = engine.submit("direct", max_new_tokens=3).result(20)
        assert done.text == EXPECTED.expected_text("direct", 3)
        assert len(proxy.lines) == 1
