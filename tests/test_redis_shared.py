"""Policies shared through a real redis-server: two processes, one budget, one cache;
and a Redis that stops mid-test costs caching, never requests."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid

import pytest

from llmbridge import Engine, Overloaded
from llmbridge.policies import Pipeline, RateLimit, RedisCache
from llmbridge.testing import simulated_engine

from support import ROOT, free_port, start_redis_server

pytestmark = pytest.mark.timeout(60)

WORKER = r"""
import json, sys
from llmbridge import Engine, RateLimited
from llmbridge.policies import Pipeline, RateLimit, RedisCache

mode, url, prefix, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = []

def backend(prompt, **params):
    calls.append(prompt)
    return "answer to " + prompt

if mode == "limit":
    limit = RateLimit(requests_per_minute=60, storage=url, prefix=prefix)
    pipeline = Pipeline(Engine(backend), rate_limit=limit)
else:
    pipeline = Pipeline(Engine(backend), cache=RedisCache(url, prefix=prefix))
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.readline()  # both processes start together
admitted = refused = 0
streams = [pipeline.submit(f"q{i}", temperature=0) for i in range(n)]
texts = []
for stream in streams:
    try:
        texts.append(stream.result(30).text)
        admitted += 1
    except RateLimited:
        refused += 1
pipeline.close()
print(json.dumps({"admitted": admitted, "refused": refused, "calls": len(calls),
                  "texts": texts, "hits": pipeline.stats.cache_hits}))
"""


def start_worker(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def finish(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = proc.communicate(timeout=45)
    assert proc.returncode == 0
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def go(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def test_two_processes_share_one_rate_limit(redis_url: str) -> None:
    """Two workers each sending 60 requests under a shared 60/minute limit: 60 in total
    are admitted, not 120."""
    prefix = f"test-{uuid.uuid4().hex}"
    procs = [start_worker("limit", redis_url, prefix, "60") for _ in range(2)]
    go(*procs)
    results = [finish(p) for p in procs]
    assert sum(int(r["admitted"]) for r in results) == 60  # type: ignore[call-overload]
    assert sum(int(r["refused"]) for r in results) == 60  # type: ignore[call-overload]
    assert sum(int(r["calls"]) for r in results) == 60  # type: ignore[call-overload]


def test_a_cache_entry_written_by_one_process_hits_in_another(redis_url: str) -> None:
    """Process A answers 5 prompts and stores them; process B gets all 5 from Redis
    without calling its backend."""
    prefix = f"test-{uuid.uuid4().hex}:"
    writer = start_worker("cache", redis_url, prefix, "5")
    go(writer)
    written = finish(writer)
    assert written["calls"] == 5
    reader = start_worker("cache", redis_url, prefix, "5")
    go(reader)
    read = finish(reader)
    assert read["calls"] == 0
    assert read["hits"] == 5
    assert read["texts"] == written["texts"] == [f"answer to q{i}" for i in range(5)]


def test_redis_stopping_mid_test_never_fails_requests(caplog: pytest.LogCaptureFixture) -> None:
    """With cache and rate limit in a Redis that dies mid-test, requests keep succeeding
    (uncached, unlimited) with a logged warning."""
    proc, url = start_redis_server()
    engine = simulated_engine(step_time=0.0, max_new_tokens=6)
    generator = engine.backend.generator
    cache = RedisCache(url, retry_interval=0.2)
    limit = RateLimit(requests_per_minute=1000, storage=url, retry_interval=0.2)
    try:
        with Pipeline(engine, cache=cache, rate_limit=limit) as pipeline:
            for _ in range(3):
                pipeline.submit("p", temperature=0).result(10)
            assert pipeline.stats.cache_hits == 2
            proc.terminate()
            proc.wait(10)
            with caplog.at_level(logging.WARNING, logger="llmbridge"):
                texts = [pipeline.submit("p", temperature=0).result(10).text for _ in range(5)]
            assert texts == [generator.expected_text("p")] * 5
            assert generator.enqueued == 6  # 1 before, then every request went uncached
            messages = [r.getMessage() for r in caplog.records]
            assert any("redis cache" in m and "unreachable" in m for m in messages)
            assert any("rate limit store" in m and "unreachable" in m for m in messages)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_fail_closed_rate_limit_refuses_when_redis_is_down() -> None:
    """With ``fail_open=False`` an unreachable store refuses requests with 503."""
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    limit = RateLimit(requests_per_minute=10, storage=url, fail_open=False)
    with (
        Pipeline(Engine(str.upper), rate_limit=limit) as pipeline,
        pytest.raises(Overloaded, match="rate limit store is unreachable") as info,
    ):
        pipeline.submit("p").result(10)
    assert info.value.status == 503


def test_redis_cache_sync_twins(redis_url: str) -> None:
    """The sync client stores JSON with a TTL and refuses non-JSON values."""
    cache = RedisCache(redis_url, prefix=f"test-{uuid.uuid4().hex}:", ttl=60)
    try:
        cache.set("k", {"chunks": ["a", "b"], "n": 1})
        assert cache.get("k") == {"chunks": ["a", "b"], "n": 1}
        assert cache.get("missing") is None
        with pytest.raises(TypeError, match="JSON"):
            cache.set("bad", {"x": {1, 2}})
        cache.delete("k")
        assert cache.get("k") is None
    finally:
        cache.close()


@pytest.mark.anyio
async def test_redis_cache_async_twins(redis_url: str) -> None:
    """The asyncio client (redis.asyncio) reads what the sync one wrote, and back."""
    cache = RedisCache(redis_url, prefix=f"test-{uuid.uuid4().hex}:", ttl=60)
    try:
        cache.set("from-sync", [1, 2])
        assert await cache.aget("from-sync") == [1, 2]
        await cache.aset("from-async", {"ok": True}, ttl=30)
        assert cache.get("from-async") == {"ok": True}
    finally:
        await cache.aclose()
        cache.close()


def test_unreachable_redis_cache_is_a_miss_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """get/set on a dead Redis return None / do nothing and log one warning."""
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", retry_interval=60)
    try:
        with caplog.at_level(logging.WARNING, logger="llmbridge"):
            assert cache.get("k") is None
            cache.set("k", "v")
            assert cache.get("k") is None
        assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
    finally:
        cache.close()
