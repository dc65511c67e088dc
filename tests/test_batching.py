"""Dynamic batching: batch size, queue delay, priorities, queue timeouts, errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from llmbridge import BackendError, BadRequest, Cancelled, Engine, Request, Timeout
from llmbridge.policies import BatchBackend

from support import wait_until

pytestmark = pytest.mark.timeout(30)


class Gate:
    """A batch function that blocks each call until released, recording its batches."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.entered = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.threads: set[int] = set()

    def __call__(self, requests: list[Request]) -> list[str | BaseException]:
        self.threads.add(threading.get_ident())
        self.batches.append([r.prompt for r in requests])
        self.entered.release()
        assert self.release.acquire(timeout=10)
        return [r.prompt.upper() for r in requests]


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    for _ in range(100):
        gate.release.release()


def test_requests_arriving_during_a_batch_form_the_next_one(gate: Gate) -> None:
    """A lone request goes at once (delay 0); the ones arriving meanwhile are batched,
    at most max_batch_size per call, and each gets its own answer."""
    backend = BatchBackend(gate, max_batch_size=4)
    with Engine(backend) as engine:
        first = engine.submit("a0")
        assert gate.entered.acquire(timeout=10)
        rest = [engine.submit(f"b{i}") for i in range(6)]
        assert wait_until(lambda: engine.queued == 6)
        for _ in range(3):
            gate.release.release()
        assert first.result(10).text == "A0"
        assert [s.result(10).text for s in rest] == [f"B{i}" for i in range(6)]
    assert gate.batches == [["a0"], ["b0", "b1", "b2", "b3"], ["b4", "b5"]]
    assert backend.batch_sizes == [1, 4, 2]


def test_max_queue_delay_waits_to_fill_a_batch() -> None:
    """With a queue delay, requests submitted together go in one call."""
    seen: list[int] = []

    def fn(requests: list[Request]) -> list[str]:
        seen.append(len(requests))
        return [r.prompt for r in requests]

    with Engine(BatchBackend(fn, max_batch_size=8, max_queue_delay=5.0)) as engine:
        streams = [engine.submit(f"p{i}") for i in range(8)]
        assert [s.result(10).text for s in streams] == [f"p{i}" for i in range(8)]
    assert seen == [8]  # full before the delay ran out


def test_higher_priority_goes_first(gate: Gate) -> None:
    """Among waiting requests, priority 1 is batched before priority 0."""
    with Engine(BatchBackend(gate, max_batch_size=2, priority_levels=2)) as engine:
        blocker = engine.submit("blocker")
        assert gate.entered.acquire(timeout=10)
        low = [engine.submit(f"low{i}", priority=0) for i in range(2)]
        high = [engine.submit(f"high{i}", priority=1) for i in range(2)]
        assert wait_until(lambda: engine.queued >= 4)
        for _ in range(4):
            gate.release.release()
        for s in [blocker, *low, *high]:
            s.result(10)
    order = [p for batch in gate.batches for p in batch]
    assert order.index("high0") < order.index("low0")
    assert order.index("high1") < order.index("low1")


def test_queue_timeout_fails_waiting_requests_with_504(gate: Gate) -> None:
    """A request that waits longer than its queue timeout fails with Timeout and never
    reaches the batch function; the per-request parameter overrides the default."""
    with Engine(BatchBackend(gate, max_batch_size=4, queue_timeout=60)) as engine:
        running = engine.submit("running")
        assert gate.entered.acquire(timeout=10)
        hurried = engine.submit("hurried", queue_timeout=0.05)
        patient = engine.submit("patient")
        with pytest.raises(Timeout) as info:
            hurried.result(10)
        assert info.value.status == 504
        gate.release.release()
        gate.release.release()
        assert running.result(10).text == "RUNNING"
        assert patient.result(10).text == "PATIENT"
    assert all("hurried" not in batch for batch in gate.batches)


def test_cancelled_while_queued_never_reaches_the_function(gate: Gate) -> None:
    """Cancelling a waiting request removes it from the next batch."""
    with Engine(BatchBackend(gate, max_batch_size=4)) as engine:
        running = engine.submit("running")
        assert gate.entered.acquire(timeout=10)
        dropped = engine.submit("dropped")
        kept = engine.submit("kept")
        dropped.cancel()
        gate.release.release()
        gate.release.release()
        assert kept.result(10).text == "KEPT"
        running.result(10)
        with pytest.raises(Cancelled):
            dropped.result(10)
    assert gate.batches == [["running"], ["kept"]]


def test_per_item_errors_fail_only_their_request() -> None:
    """An exception in the results list fails that request; the others succeed."""

    def fn(requests: list[Request]) -> list[str | BaseException]:
        return [ValueError("bad item") if r.prompt == "bad" else r.prompt for r in requests]

    with Engine(BatchBackend(fn, max_batch_size=8, max_queue_delay=0.2)) as engine:
        streams = [engine.submit(p) for p in ("ok1", "bad", "ok2")]
        assert streams[0].result(10).text == "ok1"
        with pytest.raises(BackendError, match="bad item"):
            streams[1].result(10)
        assert streams[2].result(10).text == "ok2"


@pytest.mark.parametrize(
    ("result", "match"),
    [(RuntimeError("gpu fell over"), "gpu fell over"), (["only one"], "1 results for 2")],
)
def test_a_failing_or_wrong_sized_batch_fails_all_its_requests(result: object, match: str) -> None:
    """An exception from the function, or a result list of the wrong length, fails the
    whole batch with a clear error; the engine serves the next batch."""
    calls = 0

    def fn(requests: list[Request]) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            if isinstance(result, BaseException):
                raise result
            return result
        return [r.prompt for r in requests]

    with Engine(BatchBackend(fn, max_batch_size=2, max_queue_delay=0.5)) as engine:
        streams = [engine.submit("a"), engine.submit("b")]
        for s in streams:
            with pytest.raises(BackendError, match=match):
                s.result(10)
        assert engine.submit("next").result(10).text == "next"


def test_async_batch_function_runs_on_the_engine_loop() -> None:
    """A coroutine batch function is awaited on the engine's loop, not in a thread."""
    threads: set[int] = set()

    async def fn(requests: list[Request]) -> list[str]:
        threads.add(threading.get_ident())
        return [r.prompt[::-1] for r in requests]

    with Engine(BatchBackend(fn, max_batch_size=16)) as engine:
        streams = [engine.submit(f"abc{i}") for i in range(40)]
        assert [s.result(10).text for s in streams] == [f"abc{i}"[::-1] for i in range(40)]
        assert engine.thread is not None
        assert threads == {engine.thread.ident}


def test_sync_function_never_runs_on_the_engine_thread(gate: Gate) -> None:
    """A blocking batch function runs in a worker thread, so cancellations still flow."""
    with Engine(BatchBackend(gate)) as engine:
        stream = engine.submit("x")
        assert gate.entered.acquire(timeout=10)
        gate.release.release()
        stream.result(10)
        assert engine.thread is not None
        assert engine.thread.ident not in gate.threads


def test_bad_priority_is_a_bad_request() -> None:
    """A priority outside the configured levels fails that request with 400."""
    with Engine(BatchBackend(lambda rs: [r.prompt for r in rs], priority_levels=3)) as engine:
        for bad in (3, -1, "high", True):
            with pytest.raises(BadRequest, match="priority"):
                engine.submit("x", priority=bad).result(10)
        assert engine.submit("x", priority=2).result(10).text == "x"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_batch_size": -1},
        {"max_queue_delay": -0.1},
        {"priority_levels": 1},
        {"queue_timeout": 0},
        {"max_concurrent_batches": 0},
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, float]) -> None:
    """Negative sizes and delays, a single priority level and zero timeouts raise."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BatchBackend(lambda rs: rs, **kwargs)  # type: ignore[arg-type]


@pytest.mark.slow
def test_stress_every_request_gets_its_own_answer() -> None:
    """Thousands of requests from many threads, batched: each answer is its own."""

    def fn(requests: list[Request]) -> list[str]:
        return [f"{r.id}:{r.prompt}" for r in requests]

    backend = BatchBackend(fn, max_batch_size=32, max_concurrent_batches=2)
    errors: list[str] = []
    with Engine(backend) as engine:

        def worker(t: int) -> None:
            for i in range(100):
                stream = engine.submit(f"t{t}-{i}")
                text = stream.result(30).text
                if text != f"{stream.id}:t{t}-{i}":
                    errors.append(text)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []
    assert sum(backend.batch_sizes) == 2000
    assert max(backend.batch_sizes) > 1
