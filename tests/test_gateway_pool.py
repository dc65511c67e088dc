"""OpenAIBackend's connections: several small httpx pools per upstream, never one big one.

httpcore scans every connection of a pool on each request and each response close, so
with one pool per upstream a request's cost grew with the number of requests in flight
(59% of the engine thread at 64 concurrent whole answers). These tests hold many
requests open at a real keep-alive upstream on 127.0.0.1 and count the connections each
pool holds; the last ones check :class:`~llmbridge._backends.openai.pools.ShardedPool`
without I/O.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio.from_thread
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from llmbridge import Engine
from llmbridge._backends.openai.pools import ShardedPool, split
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


def pooled_connections(backend: OpenAIBackend) -> list[int]:
    """How many connections each open pool of the first upstream holds: the list httpcore
    scans on every request and response close of that pool (httpx's own attributes)."""
    pool = backend._states[0].pool
    return [len(shard.client._transport._pool.connections) for shard in pool.shards]


def test_no_pool_holds_more_than_connections_per_pool(holding: HoldingUpstream) -> None:
    """40 streams in flight open 10 pools of 4 connections, not one pool of 40; a second
    wave reuses those pools, and the metrics show the limits and the pools open."""
    backend = OpenAIBackend(
        holding.url, model="m", max_concurrency=64, connections_per_pool=4, timeout=30
    )
    with Engine(backend, name="pools") as engine:
        for wave in range(2):
            streams = [engine.submit(f"w{wave}r{i}") for i in range(40)]
            readers = [iter(s) for s in streams]
            firsts = [next(r) for r in readers]  # every stream is in flight upstream now
            assert firsts == [f"w{wave}r{i}:" for i in range(40)]
            counts, stats = pooled_connections(backend), backend.stats
            assert counts == [4] * 10
            assert stats["upstreams"][0]["pools_open"] == 10
            assert stats["upstreams"][0]["outstanding"] == 40
            holding.release()
            assert ["".join(r) for r in readers] == ["end"] * 40
            assert all(s.result(20).finish_reason == "stop" for s in streams)
            holding.hold_again()
        registry = CollectorRegistry()
        registry.register(LLMBridgeCollector(engine))
        text = generate_latest(registry).decode()
    assert stats["connections_per_pool"] == 4
    assert stats["pools"] == 16  # ceil(64 / 4): the most this upstream may open
    assert 'llmbridge_backend_limit{engine="pools",limit="connections_per_pool"} 4.0' in text
    assert 'llmbridge_backend_limit{engine="pools",limit="pools"} 16.0' in text
    assert f'llmbridge_upstream_pools_open{{engine="pools",upstream="{holding.url}"}} 10.0' in text


def test_light_load_stays_on_one_pool_and_reuses_its_connections(
    holding: HoldingUpstream,
) -> None:
    """Requests one after another never open a second pool, and reuse a connection."""
    holding.release()
    backend = OpenAIBackend(holding.url, model="m", connections_per_pool=4, timeout=30)
    with Engine(backend) as engine:
        texts = [engine.submit(f"one{i}").result(20).text for i in range(20)]
        pools_open = backend.stats["upstreams"][0]["pools_open"]
    assert texts == [f"one{i}:end" for i in range(20)]
    assert pools_open == 1
    # Kept alive between requests (one connection, unless httpx expired an idle one
    # after 5 s); before, each stream closed its connection unread after [DONE].
    assert holding.accepted <= 3


def test_connections_stay_within_max_connections_over_all_pools(
    holding: HoldingUpstream,
) -> None:
    """max_connections=10 in pools of at most 4: 4 + 3 + 3 connections, never more, and
    the 20 requests past them wait for a connection and then complete."""
    backend = OpenAIBackend(
        holding.url,
        model="m",
        max_concurrency=30,
        max_connections=10,
        connections_per_pool=4,
        timeout=30,
    )
    with Engine(backend) as engine:
        streams = [engine.submit(f"c{i}") for i in range(30)]
        assert _wait(lambda: holding.holding == 10)
        counts = pooled_connections(backend)
        holding.release()
        texts = [s.result(30).text for s in streams]
    assert counts == [4, 3, 3]
    assert texts == [f"c{i}:end" for i in range(30)]
    assert holding.peak == 10


def test_limits_are_validated() -> None:
    """connections_per_pool must be a positive int."""
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="connections_per_pool"):
            OpenAIBackend("http://127.0.0.1:1/v1", connections_per_pool=bad)  # type: ignore[arg-type]


def _wait(predicate: Any, timeout: float = 20.0) -> bool:
    from support import wait_until

    return wait_until(predicate, timeout=timeout)


# -- ShardedPool without I/O ---------------------------------------------------------------


class FakeClient:
    def __init__(self, connections: int, keepalive: int) -> None:
        self.limits = (connections, keepalive)
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


def test_split_is_even_and_exact() -> None:
    """Limits are divided into near-equal parts, larger first, summing to the total."""
    assert split(10, 3) == [4, 3, 3]
    assert split(1024, 256) == [4] * 256
    assert split(2, 3) == [1, 1, 0]
    assert all(sum(split(t, p)) == t for t in range(0, 50) for p in range(1, 12))


def test_sharded_pool_opens_pools_only_when_the_open_ones_are_full() -> None:
    """The first pool opens at once; the next only when every open one is full; the
    open pool with the most free connections takes the next request; past the limit,
    a full one does (its request waits there for a connection)."""
    pool = ShardedPool(FakeClient, max_connections=10, max_keepalive=5, connections_per_pool=4)
    assert pool.count == 3
    assert [s.client.limits for s in pool.shards] == [(4, 2)]
    held = [pool.checkout() for _ in range(4)]
    assert len(pool.shards) == 1
    held.append(pool.checkout())  # pool 0 is full: pool 1 opens
    assert [s.client.limits for s in pool.shards] == [(4, 2), (3, 2)]
    pool.checkin(held[0])  # pool 0: 3 of 4, pool 1: 1 of 3
    assert pool.checkout() is pool.shards[1]
    held += [pool.checkout() for _ in range(5)]
    assert [s.outstanding for s in pool.shards] == [4, 3, 3]
    assert [s.client.limits for s in pool.shards][2] == (3, 1)
    pool.checkin(held[1])
    pool.checkin(held[2])  # pool 0: 2 of 4 free again
    assert [pool.checkout() for _ in range(2)] == [pool.shards[0]] * 2
    extra = pool.checkout()  # all full and none left: it waits in a full one
    assert [s.outstanding for s in pool.shards] == [5, 3, 3]
    assert extra is pool.shards[0]
    assert len(pool.shards) == 3
    clients = [s.client for s in pool.shards]
    anyio.run(pool.aclose)
    assert all(c.closed for c in clients)
