"""Retries: only before the first chunk, only retryable errors, jittered backoff."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from llmbridge import BackendError, BadRequest, Engine, Overloaded, UpstreamError
from llmbridge._policies.retry import retrying
from llmbridge.backends import CallableBackend
from llmbridge.policies import Pipeline, Retry

from support import wait_until

pytestmark = pytest.mark.timeout(30)

FAST = Retry(attempts=4, initial=0.001, max_backoff=0.01)


class Flaky:
    """Fails the first ``failures`` calls with ``error``, then answers ``"ok"``."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, prompt: str, **params: object) -> str:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n <= self.failures:
            raise self.error
        return "ok"


def test_retryable_errors_before_text_are_retried() -> None:
    """Two retryable upstream failures, then success: the consumer only sees success."""
    backend = Flaky(2, UpstreamError("503 from upstream", upstream_status=503, retryable=True))
    with Pipeline(Engine(backend), retry=FAST) as pipeline:
        assert pipeline.submit("p").result(10).text == "ok"
    assert backend.calls == 3
    assert pipeline.stats.retries == 2
    assert pipeline.stats.backend_calls == 3


def test_attempts_run_out_with_the_last_error() -> None:
    """A backend that keeps failing is tried ``attempts`` times, then its error surfaces."""
    backend = Flaky(100, UpstreamError("still down", upstream_status=502, retryable=True))
    with (
        Pipeline(Engine(backend), retry=FAST) as pipeline,
        pytest.raises(UpstreamError, match="still down"),
    ):
        pipeline.submit("p").wait_started(10)
    assert backend.calls == 4


@pytest.mark.parametrize(
    "error",
    [
        UpstreamError("400 from upstream", upstream_status=400, retryable=False),
        BadRequest("nonsense"),
        ValueError("a plain bug"),
    ],
)
def test_non_retryable_errors_are_not_retried(error: Exception) -> None:
    """Errors whose ``retryable`` is false (or plain exceptions) fail at once."""
    backend = Flaky(100, error)
    with (
        Pipeline(Engine(backend), retry=FAST) as pipeline,
        pytest.raises((UpstreamError, BadRequest, BackendError)),
    ):
        pipeline.submit("p").result(10)
    assert backend.calls == 1
    assert pipeline.stats.retries == 0


def test_no_retry_after_the_first_chunk() -> None:
    """Once text reached the consumer, a retryable failure ends the stream, unretried."""
    calls: list[int] = []

    def half(prompt: str) -> Iterator[str]:
        calls.append(1)
        yield "partial"
        raise UpstreamError("connection reset", retryable=True)

    with Pipeline(Engine(half), retry=FAST) as pipeline:
        stream = pipeline.submit("p")
        chunks = iter(stream)
        assert next(chunks) == "partial"
        with pytest.raises(UpstreamError, match="connection reset"):
            next(chunks)
    assert calls == [1]


def test_per_call_opt_out() -> None:
    """``policy={"retry": False}`` turns retries off for that call only."""
    backend = Flaky(1, UpstreamError("flaky", retryable=True))
    with Pipeline(Engine(backend), retry=FAST) as pipeline:
        with pytest.raises(UpstreamError):
            pipeline.submit("p", policy={"retry": False}).result(10)
        assert pipeline.submit("p").result(10).text == "ok"


def test_a_full_engine_queue_is_retried() -> None:
    """The engine's Overloaded (queue full) is retryable: the request waits its turn."""
    gate = threading.Event()

    def slow(prompt: str) -> str:
        gate.wait(10)
        return prompt

    # One call at a time, one waiting: a third request finds the queue full.
    engine = Engine(CallableBackend(slow, max_concurrency=1), max_queued=1)
    with Pipeline(engine, retry=Retry(attempts=500, initial=0.01, max_backoff=0.02)) as pipeline:
        streams = [pipeline.submit(name) for name in ("first", "second", "third")]
        assert wait_until(lambda: pipeline.stats.retries >= 2)
        gate.set()
        assert [s.result(10).text for s in streams] == ["first", "second", "third"]


@pytest.mark.anyio
async def test_backoff_respects_retry_after_and_the_cap() -> None:
    """Waits are at least the error's retry_after (capped at max_backoff), at most the cap."""
    delays: list[float] = []
    attempts = 0

    async def attempt() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 4:
            raise Overloaded("busy", retry_after=0.02 if attempts == 1 else 99.0)
        return "done"

    policy = Retry(attempts=5, initial=0.001, max_backoff=0.05)
    result = await retrying(
        attempt,
        policy,
        may_retry=lambda e: True,
        on_retry=lambda e, d: delays.append(d),
    )
    assert result == "done"
    assert len(delays) == 3
    assert 0.02 <= delays[0] <= 0.05
    assert delays[1] == delays[2] == 0.05  # a huge retry_after is capped


@pytest.mark.anyio
async def test_jitter_spreads_the_waits() -> None:
    """Full jitter: waits for the same attempt number differ between runs."""
    seen: set[float] = set()
    for _ in range(20):

        async def attempt() -> None:
            raise Overloaded("busy", retry_after=None)

        with pytest.raises(Overloaded):
            await retrying(
                attempt,
                Retry(attempts=2, initial=0.001, max_backoff=0.002),
                may_retry=lambda e: True,
                on_retry=lambda e, d: seen.add(d),
            )
    assert len(seen) > 10


@pytest.mark.anyio
async def test_a_deadline_stops_retrying() -> None:
    """No retry is started whose wait would pass the deadline."""
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise Overloaded("busy", retry_after=0.5)

    with pytest.raises(Overloaded):
        await retrying(
            attempt,
            Retry(attempts=10, initial=0.5, max_backoff=1.0),
            may_retry=lambda e: True,
            deadline=time.monotonic() + 0.2,
        )
    assert calls == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"attempts": 0}, {"attempts": 1.5}, {"initial": 0}, {"initial": 1, "max_backoff": 0.5}],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, float]) -> None:
    """Zero attempts, non-positive waits and an inverted cap raise ValueError."""
    with pytest.raises(ValueError, match="must be"):
        Retry(**kwargs)  # type: ignore[arg-type]
