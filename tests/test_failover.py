"""OpenAIBackend over several upstreams: balancing, failover, cooldowns, metrics.

The upstreams are real processes (``tests/gateway_upstream.py`` under uvicorn) that the
tests kill with SIGKILL mid-load and start again on the same port.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmbridge import Engine, UpstreamError
from llmbridge.backends import OpenAIBackend, Upstream

from support import PYTHON, Server, free_port, run_server

ANSWER = "Answer 0: hello from the fake upstream."
MESSAGES = [{"role": "user", "content": "hi"}]


@contextlib.contextmanager
def _upstream(port: int, name: str, delay: float) -> Iterator[Server]:
    args = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
            "--no-access-log", "gateway_upstream:app"]  # fmt: skip
    env = {"UPSTREAM_NAME": name, "TOKEN_DELAY": str(delay)}
    with run_server(args, port=port, env=env) as server:
        yield server


def _by_name(backend: OpenAIBackend) -> dict[str, dict[str, Any]]:
    return {u["name"]: u for u in backend.stats["upstreams"]}


def _read(stream: Any) -> tuple[str, BaseException | None]:
    text: list[str] = []
    try:
        for chunk in stream:
            text.append(chunk)
        return "".join(text), None
    except UpstreamError as exc:
        return "".join(text), exc


@pytest.mark.timeout(120)
def test_killed_upstream_fails_over_before_the_first_chunk_and_cools_down() -> None:
    """Under load, upstream a is killed (SIGKILL) and later restarted on its port.
    Streams already reading from a end with a clear error after their text (never a
    second copy from b); every stream that had no text yet, and every request after the
    kill, is answered whole by b; a cooling a gets no requests at all; once restarted
    and its cooldown over, a serves again."""
    port_a, port_b = free_port(), free_port()
    upstreams = [
        Upstream(f"http://127.0.0.1:{port_a}/v1", name="a"),
        Upstream(f"http://127.0.0.1:{port_b}/v1", name="b"),
    ]
    # failures=7: a's six broken streams and the first connection refused open its breaker.
    backend = OpenAIBackend(upstreams=upstreams, failures=7, cooldown=8.0, model="m")
    with _upstream(port_b, "b", 0.05), Engine(backend) as engine:
        with _upstream(port_a, "a", 0.05) as a:
            streams = [engine.chat(MESSAGES) for _ in range(12)]
            results: list[tuple[str, BaseException | None]] = [("", None)] * len(streams)

            def reader(i: int) -> None:
                results[i] = _read(streams[i])

            threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(streams))]
            for thread in threads:
                thread.start()
            for stream in streams:
                stream.wait_started(20)  # every stream has text: none may fail over now
            assert _by_name(backend)["a"]["outstanding"] == 6  # least outstanding: 6 and 6
            a.proc.kill()  # mid-stream for a's six
            a.proc.wait(10)
            # New requests while a is dead: the first one to try a fails over to b.
            after = [engine.chat(MESSAGES).result(30).text for _ in range(6)]
            for thread in threads:
                thread.join(30)
        cut = [(t, e) for t, e in results if e is not None]
        assert len(cut) == 6
        for text, error in cut:
            assert text
            assert ANSWER.startswith(text)
            assert text != ANSWER
            assert "connection" in str(error)
        assert [t for t, e in results if e is None] == [ANSWER] * 6
        assert after == [ANSWER] * 6
        stats = _by_name(backend)
        assert stats["a"]["cooling_down"]
        assert stats["a"]["failures"] == 7  # six cut streams, one refused connection
        assert stats["a"]["requests"] == 7
        assert stats["a"]["failovers"] == 1
        assert stats["b"]["requests"] == 12

        # a comes back on the same port; after the cooldown a probe finds it healthy.
        with _upstream(port_a, "a", 0.0):
            for _ in range(6):
                assert engine.chat(MESSAGES).result(30).text == ANSWER
            assert _by_name(backend)["a"]["requests"] == 7  # still cooling down: not tried
            deadline = threading.Event()
            deadline.wait(_cooldown_left(backend, "a") + 0.1)
            answers = [engine.chat(MESSAGES).result(30).text for _ in range(4)]
        assert answers == [ANSWER] * 4
        stats = _by_name(backend)
        assert not stats["a"]["cooling_down"]
        assert stats["a"]["requests"] > 7  # serving again
        assert stats["a"]["outstanding"] == stats["b"]["outstanding"] == 0


def _cooldown_left(backend: OpenAIBackend, name: str) -> float:
    state = next(s for s in backend._states if s.upstream.label == name)
    return state.cooldown_left


@pytest.mark.timeout(60)
def test_least_outstanding_balancing_follows_the_weights() -> None:
    """Eight held streams over weights 3 and 1 sit six and two; with equal weights the
    next eight split four and four."""
    port_a, port_b = free_port(), free_port()
    with _upstream(port_a, "a", 0.2), _upstream(port_b, "b", 0.2):
        for weights, expected in (((3.0, 1.0), (6, 2)), ((1.0, 1.0), (4, 4))):
            upstreams = [
                Upstream(f"http://127.0.0.1:{port_a}/v1", name="a", weight=weights[0]),
                Upstream(f"http://127.0.0.1:{port_b}/v1", name="b", weight=weights[1]),
            ]
            with Engine(OpenAIBackend(upstreams=upstreams, model="m")) as engine:
                streams = [engine.chat(MESSAGES) for _ in range(8)]
                for stream in streams:
                    stream.wait_started(20)
                stats = engine.backend.stats  # type: ignore[attr-defined]
                held = tuple(u["outstanding"] for u in stats["upstreams"])
                for stream in streams:
                    stream.close()
            assert held == expected


@pytest.mark.timeout(60)
def test_all_upstreams_down_fails_fast_without_retrying_each() -> None:
    """With every upstream dead, a request fails over through each once and fails with
    a retryable UpstreamError; while they cool down the next ones fail at once, naming
    when to come back, without a connection attempt."""
    urls = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    backend = OpenAIBackend(upstreams=urls, failures=1, cooldown=30.0)
    with Engine(backend) as engine:
        with pytest.raises(UpstreamError, match="connection failed") as first:
            engine.submit("x").result(20)
        assert first.value.retryable
        for _ in range(5):
            with pytest.raises(UpstreamError, match="cooling down") as later:
                engine.submit("x").result(20)
            assert later.value.retry_after is not None
            assert 0 < later.value.retry_after <= 30
    assert [u["requests"] for u in backend.stats["upstreams"]] == [1, 1]
    assert [u["cooling_down"] for u in backend.stats["upstreams"]] == [True, True]


@pytest.mark.timeout(90)
def test_gateway_under_load_survives_an_upstream_restart() -> None:
    """Through a real Quart gateway (uvicorn) over two upstreams: 120 whole answers, 8 at
    a time, while upstream b is killed with requests in flight and later restarted.
    Every request is answered 200 with the whole text (a failure before the first chunk
    fails over), and the gateway's /stats shows b's failures, failovers and return."""
    from concurrent.futures import ThreadPoolExecutor

    port_a, port_b = free_port(), free_port()
    with _upstream(port_a, "a", 0.0), _upstream(port_b, "b", 0.05) as b:
        env = {
            "GATEWAY_APP": "quart",
            "UPSTREAM_URLS": f"http://127.0.0.1:{port_a}/v1,http://127.0.0.1:{port_b}/v1",
            "FAILURES": "1",
            "COOLDOWN": "1",
        }
        port = free_port()
        args = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
                "--no-access-log", "gateway_apps:app"]  # fmt: skip
        with (
            run_server(args, port=port, env=env) as gw,
            httpx.Client(timeout=30, limits=httpx.Limits(max_connections=8)) as client,
        ):
            body = {"model": "gpt-test", "messages": MESSAGES}
            url = f"{gw.url}/v1/chat/completions"

            def one(_: int) -> tuple[int, str]:
                reply = client.post(url, json=body)
                return reply.status_code, reply.json()["choices"][0]["message"]["content"]

            with ThreadPoolExecutor(8) as pool:
                # Enough that many are still to come when b dies, however fast a is.
                running = [pool.submit(one, i) for i in range(120)]
                running[4].result(30)  # under way, some in flight on b
                b.proc.kill()
                b.proc.wait(10)
                answers = [f.result(30) for f in running]
            during = {u["name"]: u for u in client.get(f"{gw.url}/stats").json()["upstreams"]}
            with _upstream(port_b, "b", 0.0):
                threading.Event().wait(1.2)  # the cooldown passes
                after = [one(i) for i in range(10)]
            stats = {u["name"]: u for u in client.get(f"{gw.url}/stats").json()["upstreams"]}
    assert answers == [(200, ANSWER)] * 120
    assert after == [(200, ANSWER)] * 10
    assert during["u1"]["failures"] >= 1
    assert during["u1"]["failovers"] >= 1
    assert stats["u1"]["requests"] > during["u1"]["requests"]  # it served again
    assert not stats["u1"]["cooling_down"]


@pytest.mark.timeout(30)
def test_upstream_counters_are_prometheus_metrics() -> None:
    """The collector exports the backend's limits and per-upstream counters, labelled
    by upstream name."""
    from prometheus_client import CollectorRegistry, generate_latest

    from llmbridge.metrics import LLMBridgeCollector

    urls = [f"http://127.0.0.1:{free_port()}/v1"]
    upstreams = [Upstream(urls[0], name="dead"), Upstream(urls[0] + "x", name="other")]
    backend = OpenAIBackend(upstreams=upstreams, failures=1, max_concurrency=64)
    registry = CollectorRegistry()
    with Engine(backend) as engine:
        registry.register(LLMBridgeCollector(engine, name="gw"))
        with pytest.raises(UpstreamError):
            engine.submit("x").result(20)
        text = generate_latest(registry).decode()
    assert 'llmbridge_backend_limit{engine="gw",limit="max_connections"} 64.0' in text
    assert 'llmbridge_upstream_requests_total{engine="gw",upstream="dead"} 1.0' in text
    assert 'llmbridge_upstream_failures_total{engine="gw",upstream="dead"} 1.0' in text
    assert 'llmbridge_upstream_failovers_total{engine="gw",upstream="dead"} 1.0' in text
    assert 'llmbridge_upstream_cooling_down{engine="gw",upstream="dead"} 1.0' in text
    assert 'llmbridge_upstream_outstanding{engine="gw",upstream="other"} 0.0' in text


def test_breaker_states_without_io() -> None:
    """The per-upstream breaker and the balancer, on a fake clock: the breaker opens
    after ``failures`` in a row; while cooling down the upstream is skipped; after it,
    one probe at a time; a cancelled probe says nothing (the next failure re-opens at
    once), an answer closes it."""
    from llmbridge._backends.openai.upstreams import Balancer, UpstreamState

    now = [0.0]
    a, b = (
        UpstreamState(
            Upstream(f"http://{n}/v1", name=n), failures=2, cooldown=5, clock=lambda: now[0]
        )
        for n in "ab"
    )
    balancer = Balancer([a, b])
    for _ in range(2):
        a.begin()
        a.end(failed=True)
    assert a.cooling_down
    assert balancer.pick() is b
    assert balancer.pick([b]) is None
    assert balancer.soonest_back() == 5
    now[0] = 5.0
    assert not a.cooling_down
    assert a.available()
    assert balancer.pick([b]) is a  # available again (b, with fewer requests, comes first)
    a.begin()  # the probe
    assert not a.available()  # one probe at a time
    a.end(failed=None)  # cancelled: neither closes nor counts
    a.begin()
    a.end(failed=True)  # the next failure re-opens at once
    assert a.cooling_down
    now[0] = 10.0
    a.begin()
    a.end(failed=False)
    assert a.available()
    assert not a.cooling_down
    assert a.as_dict()["cooldowns"] == 2


def test_balancer_prefers_fewest_outstanding_per_weight() -> None:
    """Outstanding per unit of weight decides, then requests per unit of weight."""
    from llmbridge._backends.openai.upstreams import Balancer, UpstreamState

    heavy, light = (
        UpstreamState(Upstream(f"http://{n}/v1", weight=w), failures=1, cooldown=1)
        for n, w in (("h", 2.0), ("l", 1.0))
    )
    balancer = Balancer([light, heavy])
    picks = []
    for _ in range(6):
        chosen = balancer.pick()
        assert chosen is not None
        chosen.begin()
        picks.append("h" if chosen is heavy else "l")
    assert picks.count("h") == 4
    assert picks.count("l") == 2
