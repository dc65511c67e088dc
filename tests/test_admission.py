"""Admission by tokens and priority: ``max_queued_tokens`` with a ``Retry-After`` from the
drain rate, and a ``priority`` that every backend's waiting jobs honour, with aging so no
request starves. Engine-level tests, then through a real werkzeug server
(``admission_apps``): 503 + ``Retry-After``, ``X-Priority``, the ``/v1`` ``priority``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask

from llmbridge import BadRequest, Engine, Overloaded
from llmbridge._core.admission import DrainRate, WaitingJobs, estimate_tokens
from llmbridge.backends import CallableBackend, StepBackend
from llmbridge.flask import FlaskBridge
from llmbridge.policies import BatchBackend

from support import PYTHON, Clock, Server, free_port, run_server, wait_until


class Gated:
    """A callable backend: ``gate`` holds the one slot until released; records order."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.gate = threading.Event()

    def __call__(self, prompt: str, **params: Any) -> str:
        self.order.append(prompt)
        if prompt == "gate":
            self.gate.wait(30)
        return prompt


class GatedAsync(Gated):
    """:class:`Gated` as a coroutine function (``call``)."""

    async def call(self, prompt: str, **params: Any) -> str:  # type: ignore[override]
        self.order.append(prompt)
        if prompt == "gate":
            await asyncio.to_thread(self.gate.wait, 30)
        return prompt


class GatedSteps:
    """A step generator whose first step for ``gate`` blocks until released."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.gate = threading.Event()
        self.jobs: dict[str, str] = {}

    def make_job(self, request: Any) -> tuple[str, str]:
        return (request.id, request.prompt)

    def enqueue(self, job: tuple[str, str]) -> None:
        self.order.append(job[1])
        self.jobs[job[0]] = job[1]

    def cancel(self, job: tuple[str, str]) -> None:
        self.jobs.pop(job[0], None)

    def iterate(self) -> list[dict[str, Any]]:
        if "gate" in self.jobs.values():
            self.gate.wait(30)
        done = [{"identifier": i, "text": p, "eos": True} for i, p in self.jobs.items()]
        self.jobs.clear()
        return done


# -- tokens ---------------------------------------------------------------------------


def test_default_estimate_is_characters_over_four() -> None:
    """The default prompt estimate: ceil(characters / 4)."""
    assert [estimate_tokens("x" * n) for n in (0, 1, 4, 5, 400)] == [0, 1, 1, 2, 100]


@pytest.mark.timeout(30)
def test_max_queued_tokens_counts_prompt_and_new_tokens() -> None:
    """Queued requests hold their prompt estimate plus max_new_tokens; past the bound a
    submit is refused with Overloaded, and a request leaving the queue frees its tokens."""
    backend = Gated()
    with Engine(CallableBackend(backend, max_concurrency=1), max_queued_tokens=100) as engine:
        gate = engine.submit("gate")
        assert wait_until(lambda: backend.order == ["gate"])
        first = engine.submit("a" * 160, max_new_tokens=20)  # 40 + 20
        assert engine.queued_tokens == 60
        with pytest.raises(Overloaded, match="tokens already queued") as refused:
            engine.submit("b" * 160, max_tokens=20)
        assert refused.value.retry_after is not None
        assert refused.value.retry_after >= 1
        assert engine.stats.rejected == 1
        small = engine.submit("c" * 60, max_new_tokens=25)  # 15 + 25: fits
        assert engine.queued_tokens == 100
        small.cancel()
        assert wait_until(lambda: engine.queued_tokens == 60)
        backend.gate.set()
        assert gate.result(10).text == "gate"
        assert first.result(10).text == "a" * 160
        assert engine.queued_tokens == 0


@pytest.mark.timeout(30)
def test_a_request_larger_than_the_bound_enters_an_empty_queue_only() -> None:
    """A request that alone exceeds max_queued_tokens is admitted when nothing else waits
    (else it could never run), and refused behind others."""
    backend = Gated()
    engine = Engine(
        CallableBackend(backend, max_concurrency=1),
        max_queued_tokens=10,
        token_estimate=lambda prompt: 1000,
    )
    with engine:
        gate = engine.submit("gate")
        assert wait_until(lambda: backend.order == ["gate"])
        big = engine.submit("big")
        with pytest.raises(Overloaded):
            engine.submit("another")
        backend.gate.set()
        assert gate.result(10).text == "gate"
        assert big.result(10).text == "big"


def test_retry_after_is_computed_from_the_drain_rate() -> None:
    """Retry-After = what must leave / the rate the queue drained over the last 30 s, in
    [1, 300] s; 1 s when nothing left lately."""
    clock = Clock()
    rate = DrainRate(clock=clock)
    assert rate.retry_after(5) == 1.0
    for second in range(10):
        clock.now = float(second)
        rate.record(100)  # one request of 100 tokens a second
    clock.now = 10.0
    assert rate.retry_after(5) == pytest.approx(5.0)
    assert rate.retry_after(250, tokens=True) == pytest.approx(2.5)
    assert rate.retry_after(100_000) == 300.0
    clock.now = 100.0  # the samples are older than the window
    assert rate.retry_after(5) == 1.0


@pytest.mark.timeout(30)
def test_a_refusal_by_count_carries_the_drain_rate() -> None:
    """max_queued refusals use the engine's drain rate: 5 departures over 8 s, one
    request beyond the bound -> Retry-After 1.6 s."""
    clock = Clock(2.0)
    backend = Gated()
    with Engine(CallableBackend(backend, max_concurrency=1), max_queued=1) as engine:
        engine._drain_rate = DrainRate(clock=clock)
        for _ in range(4):
            engine._drain_rate.record(0)  # t = 2, 4, 6, 8
            clock.now += 2.0
        clock.now = 8.0
        gate = engine.submit("gate")  # its start is the fifth departure, at t = 8
        assert wait_until(lambda: backend.order == ["gate"])
        waiting = engine.submit("waiting")
        clock.now = 10.0
        with pytest.raises(Overloaded) as refused:
            engine.submit("x")
        assert refused.value.retry_after == pytest.approx(1.6)
        backend.gate.set()
        assert gate.result(10).text == "gate"
        assert waiting.result(10).text == "waiting"


# -- priority -------------------------------------------------------------------------


def test_waiting_jobs_order_by_aged_priority() -> None:
    """WaitingJobs pops the lowest rank first (submit time moved earlier by priority *
    aging); equal ranks keep arrival order."""

    class Fake:
        def __init__(self, rank: float) -> None:
            self.rank = rank

    a, b, c, d = Fake(5.0), Fake(1.0), Fake(5.0), Fake(3.0)
    waiting = WaitingJobs([a, b, c])  # type: ignore[list-item]
    waiting.append(d)  # type: ignore[arg-type]
    assert len(waiting) == 4
    assert list(waiting) == [b, d, a, c]
    assert [waiting.popleft() for _ in range(4)] == [b, d, a, c]
    assert not waiting


def backends() -> dict[str, Any]:
    return {
        "step": lambda: (gen := GatedSteps(), StepBackend(gen, gen.make_job, max_batch_size=1)),
        "sync-callable": lambda: (g := Gated(), CallableBackend(g, max_concurrency=1)),
        "async-callable": lambda: (g := GatedAsync(), CallableBackend(g.call, max_concurrency=1)),
    }


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(backends()))
def test_every_backend_starts_waiting_requests_by_priority(kind: str) -> None:
    """Behind a busy slot, waiting requests start highest priority first (FIFO among
    equals), for a step generator, a sync callable and an async callable alike."""
    recorder, backend = backends()[kind]()
    with Engine(backend) as engine:
        gate = engine.submit("gate")
        assert wait_until(lambda: recorder.order == ["gate"])
        streams = [
            engine.submit("low", priority=0),
            engine.submit("high", priority=5),
            engine.submit("low2"),
            engine.submit("mid", priority=2),
            engine.submit("below", priority=-1),
        ]
        if kind != "step":  # the step driver is blocked in iterate(): it takes them at once
            assert wait_until(lambda: engine.stats.submitted == 6)
        recorder.gate.set()
        assert gate.result(10).text == "gate"
        for stream in streams:
            stream.result(10)
        assert recorder.order == ["gate", "high", "mid", "low", "low2", "below"]


def test_priority_must_be_an_int() -> None:
    """A priority that is not an int is a bad request at submit."""
    with Engine(lambda prompt, **params: prompt) as engine:
        for bad in ("high", 1.5, True, None):
            with pytest.raises(BadRequest, match="priority"):
                engine.submit("x", priority=bad)
        assert engine.submit("x", priority=-3).result(10).text == "x"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["callable", "batch"])
def test_a_low_priority_request_is_served_within_the_aging_bound(kind: str) -> None:
    """Under a constant stream of priority-10 requests (each one served submits the next,
    so 4 always wait), a priority-0 request is served, and no priority-10 request
    submitted more than 10 * aging seconds after it starts before it. Without aging it
    would wait for as long as the stream runs. The same for a one-slot callable and a
    batch function taking one request a call."""
    aging = 0.05
    high: dict[str, float] = {}  # prompt -> submitted at
    streams: list[Any] = []
    order: list[str] = []
    done = threading.Event()

    def submit_high() -> None:
        prompt = f"h{len(high)}"
        stream = engine.submit(prompt, priority=10)
        high[prompt] = stream.channel.request.submitted_at
        streams.append(stream)

    def serve(prompt: str) -> str:
        order.append(prompt)
        if prompt != "low" and not done.is_set() and len(high) < 100_000:
            submit_high()  # the stream never dries up while the low request waits
        return prompt

    backend: Any
    if kind == "callable":
        backend = CallableBackend(serve, max_concurrency=1)
    else:
        backend = BatchBackend(
            lambda requests: [serve(r.prompt) for r in requests],
            max_batch_size=1,
            priority_levels=11,
        )
    engine = Engine(backend, priority_aging=aging)
    with engine:
        for _ in range(4):
            submit_high()
        low = engine.submit("low", priority=0)
        low_at = low.channel.request.submitted_at
        assert low.result(30).text == "low"
        done.set()
        served_before = [high[prompt] for prompt in order[: order.index("low")]]
        assert max(served_before) <= low_at + 10 * aging
        # Newer high-priority requests did go first, for a while: priority is in effect.
        assert any(at > low_at for at in served_before)
        for stream in streams:
            stream.cancel()


# -- through a real server ------------------------------------------------------------

FLASK = str(Path(PYTHON).parent / "flask")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    args = [FLASK, "--app", "admission_apps:app", "run", "--port", "{port}", "--no-reload"]
    with run_server(args, port=free_port(), ready_timeout=60) as server:
        yield server


def in_background(call: Any) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(call()), daemon=True)
    thread.start()
    return thread, outcome


def held(client: httpx.Client) -> tuple[threading.Thread, list[Any]]:
    """Reset the app and hold its one slot with the gate request."""
    client.get("/reset")
    gate = in_background(lambda: client.get("/gen", params={"prompt": "gate"}, timeout=30))
    assert wait_until(lambda: client.get("/state").json()["order"] == ["gate"])
    return gate


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_http_token_bound_answers_503_with_retry_after(server: Server) -> None:
    """Past max_queued_tokens the server answers 503 problem+json with Retry-After."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        gate = held(client)
        queued = in_background(lambda: client.get("/gen", params={"prompt": "a" * 200, "n": 10}))
        assert wait_until(lambda: client.get("/state").json()["queued_tokens"] == 60)
        refused = client.get("/gen", params={"prompt": "b" * 200, "n": 10})
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) >= 1
        assert "tokens already queued" in refused.json()["detail"]
        client.get("/release")
        for thread, outcome in (gate, queued):
            thread.join(20)
            assert outcome[0].status_code == 200


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_http_x_priority_orders_the_queue(server: Server) -> None:
    """With priority_levels, X-Priority orders waiting requests; a bad value is a 400."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        gate = held(client)
        calls = [
            in_background(
                lambda p=p, h=h: client.get("/gen", params={"prompt": p}, headers=h, timeout=30)
            )
            for p, h in (("low", {"X-Priority": "0"}), ("none", {}), ("high", {"X-Priority": "3"}))
        ]
        assert wait_until(lambda: client.get("/state").json()["queued"] == 3)
        bad = client.get("/gen", params={"prompt": "x"}, headers={"X-Priority": "4"})
        assert bad.status_code == 400
        assert "X-Priority" in bad.json()["detail"]
        client.get("/release")
        for thread, outcome in (gate, *calls):
            thread.join(20)
            assert outcome[0].status_code == 200
        order = client.get("/state").json()["order"]
        assert order[:2] == ["gate", "high"]
        assert set(order[2:]) == {"low", "none"}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_http_v1_priority_field(server: Server) -> None:
    """Under /v1 (Settings.priority_levels), the request's priority field orders the
    queue; out of range is an OpenAI-shaped 400."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        gate = held(client)

        def complete(prompt: str, priority: int) -> httpx.Response:
            body = {"model": "llmbridge", "prompt": prompt, "priority": priority}
            return client.post("/v1/completions", json=body, timeout=30)

        low = in_background(lambda: complete("low", 0))
        assert wait_until(lambda: client.get("/state").json()["queued"] == 1)
        high = in_background(lambda: complete("high", 2))
        assert wait_until(lambda: client.get("/state").json()["queued"] == 2)
        bad = complete("x", 7)
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "priority"
        client.get("/release")
        for thread, outcome in (gate, low, high):
            thread.join(20)
            assert outcome[0].status_code == 200
        assert client.get("/state").json()["order"] == ["gate", "high", "low"]


def test_x_priority_is_ignored_unless_opted_in() -> None:
    """Without priority_levels the bridge never reads X-Priority (no 400, no priority)."""
    seen: list[Any] = []
    with Engine(lambda prompt, **params: seen.append(params) or "ok") as engine:
        app = Flask(__name__)
        bridge = FlaskBridge(app, engine=engine)

        @app.get("/gen")
        def gen() -> Any:
            return {"text": bridge.generate("x")}

        response = app.test_client().get("/gen", headers={"X-Priority": "banana"})
        assert response.status_code == 200
        assert seen == [{}]
