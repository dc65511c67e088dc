"""OpenAIBackend's connections to an upstream: sized from the configuration, kept alive
between requests, never more than ``max_connections``, and visible in the metrics.

The tests hold many streams open at a real keep-alive HTTP/1.1 upstream on 127.0.0.1 and
count, on the upstream's side, the connections accepted, open now and at most.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from llmbridge import Engine
from llmbridge.backends import OpenAIBackend
from llmbridge.metrics import LLMBridgeCollector

from support import RawUpstream, read_http_body

pytestmark = pytest.mark.timeout(60)


@dataclass
class HoldingUpstream(RawUpstream):
    """A keep-alive HTTP/1.1 upstream: each streamed completion sends one event, then
    waits for :meth:`release` before it ends. Counts connections accepted, open now and
    at most, and requests holding their stream now."""

    path: str = "/v1"
    holding: int = 0
    _release: asyncio.Event | None = None

    def release(self) -> None:
        """Let every held stream end (and later ones not wait)."""
        self.portal.call(self._set_release)

    def hold_again(self) -> None:
        """Make the next streams wait for :meth:`release` again."""
        self.portal.call(self._clear_release)

    def _set_release(self) -> None:
        assert self._release is not None
        self._release.set()

    def _clear_release(self) -> None:
        assert self._release is not None
        self._release.clear()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.connection():
            try:
                while True:  # one request after another on this connection (keep-alive)
                    prompt = json.loads(await read_http_body(reader))["prompt"]
                    await self.respond(prompt, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

    async def respond(self, prompt: str, writer: asyncio.StreamWriter) -> None:
        def chunk(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        def event(text: str, finish: str | None = None) -> bytes:
            choice = {"index": 0, "text": text, "finish_reason": finish}
            return chunk(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())

        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + event(f"{prompt}:")
        )
        await writer.drain()
        assert self._release is not None
        with self.lock:
            self.holding += 1
        try:
            await self._release.wait()
        finally:
            with self.lock:
                self.holding -= 1
        writer.write(event("end", "stop") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def starting(self) -> None:
        self._release = asyncio.Event()

    def stopping(self) -> None:
        assert self._release is not None
        self._release.set()


@pytest.fixture
def holding() -> Iterator[HoldingUpstream]:
    with HoldingUpstream().running() as upstream:
        yield upstream


def test_streams_in_flight_each_hold_a_connection_and_a_second_wave_reuses_them(
    holding: HoldingUpstream,
) -> None:
    """40 streams in flight hold 40 connections at once (none waits for another's); a
    second wave reuses them instead of opening 40 more, and the metrics show the
    limits and the requests outstanding."""
    backend = OpenAIBackend(holding.url, model="m", max_concurrency=64, timeout=30)
    with Engine(backend, name="pools") as engine:
        for wave in range(2):
            streams = [engine.submit(f"w{wave}r{i}") for i in range(40)]
            readers = [iter(s) for s in streams]
            firsts = [next(r) for r in readers]  # every stream is in flight upstream now
            assert firsts == [f"w{wave}r{i}:" for i in range(40)]
            assert _wait(lambda: holding.holding == 40)
            stats = backend.stats
            assert stats["upstreams"][0]["outstanding"] == 40
            holding.release()
            assert ["".join(r) for r in readers] == ["end"] * 40
            assert all(s.result(20).finish_reason == "stop" for s in streams)
            holding.hold_again()
        registry = CollectorRegistry()
        registry.register(LLMBridgeCollector(engine))
        text = generate_latest(registry).decode()
    assert holding.peak == 40
    assert holding.accepted == 40  # the second wave found them kept alive
    assert stats["max_connections"] == 64  # sized from max_concurrency
    assert 'llmbridge_backend_limit{engine="pools",limit="max_concurrency"} 64.0' in text
    assert 'llmbridge_backend_limit{engine="pools",limit="max_connections"} 64.0' in text
    assert f'llmbridge_upstream_outstanding{{engine="pools",upstream="{holding.url}"}} 0.0' in text


def test_light_load_reuses_one_connection(holding: HoldingUpstream) -> None:
    """Requests one after another reuse a kept-alive connection: the body's end is read
    after ``[DONE]``, so no stream closes its connection unread."""
    holding.release()
    backend = OpenAIBackend(holding.url, model="m", timeout=30)
    with Engine(backend) as engine:
        texts = [engine.submit(f"one{i}").result(20).text for i in range(20)]
    assert texts == [f"one{i}:end" for i in range(20)]
    assert holding.accepted == 1


def test_an_idle_connection_is_closed_after_keepalive_expiry(holding: HoldingUpstream) -> None:
    """A connection idle past ``keepalive_expiry`` is not reused (the upstream may have
    closed it by then): the next request opens a new one."""
    holding.release()
    backend = OpenAIBackend(holding.url, model="m", timeout=30, keepalive_expiry=0.3)
    with Engine(backend) as engine:
        assert engine.submit("a").result(20).text == "a:end"
        assert engine.submit("b").result(20).text == "b:end"
        assert holding.accepted == 1
        assert _wait(lambda: holding.open_now == 0, timeout=10)  # closed by our side
        assert engine.submit("c").result(20).text == "c:end"
    assert holding.accepted == 2


def test_connections_stay_within_max_connections(holding: HoldingUpstream) -> None:
    """max_connections=10 with 30 requests admitted: 10 connections, never more, and the
    20 requests past them wait for a connection and then complete."""
    backend = OpenAIBackend(
        holding.url, model="m", max_concurrency=30, max_connections=10, timeout=30
    )
    with Engine(backend) as engine:
        streams = [engine.submit(f"c{i}") for i in range(30)]
        assert _wait(lambda: holding.holding == 10)
        assert backend.stats["in_flight"] == 30
        holding.release()
        texts = [s.result(30).text for s in streams]
    assert texts == [f"c{i}:end" for i in range(30)]
    assert holding.peak == 10


def test_limits_are_validated() -> None:
    """max_connections must be a positive int, keepalive_expiry a positive number."""
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_connections"):
            OpenAIBackend("http://127.0.0.1:1/v1", max_connections=bad)  # type: ignore[arg-type]
    for expiry in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="keepalive_expiry"):
            OpenAIBackend("http://127.0.0.1:1/v1", keepalive_expiry=expiry)


def _wait(predicate: Any, timeout: float = 20.0) -> bool:
    from support import wait_until

    return wait_until(predicate, timeout=timeout)
