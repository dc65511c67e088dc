"""The circuit breaker: opens on failures or slow calls, fails fast, half-open probes."""

from __future__ import annotations

import threading

import pytest

from llmbridge import Cancelled, CircuitOpen, Engine, UpstreamError
from llmbridge.policies import CircuitBreaker, Pipeline

from support import Clock

pytestmark = pytest.mark.timeout(30)


class Backend:
    """Fails while ``failing`` is set; counts every call that reached it."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, prompt: str) -> str:
        with self.lock:
            self.calls += 1
        if self.failing:
            raise UpstreamError("upstream 500", upstream_status=500)
        return "healthy"


def test_failing_backend_opens_then_fails_fast_until_a_probe_succeeds() -> None:
    """Every call failing opens the breaker; later calls fail with CircuitOpen (503,
    Retry-After) without reaching the backend; after open_for, one probe goes through
    and its success closes the breaker."""
    clock = Clock(1000.0)
    breaker = CircuitBreaker(window=4, min_calls=4, failure_ratio=1.0, open_for=30, clock=clock)
    backend = Backend()
    with Pipeline(Engine(backend), breaker=breaker) as pipeline:
        for _ in range(4):
            with pytest.raises(UpstreamError):
                pipeline.submit("p").result(10)
        assert breaker.state == "open"
        for _ in range(10):
            with pytest.raises(CircuitOpen) as info:
                pipeline.submit("p").wait_started(10)
        assert info.value.status == 503
        assert info.value.retry_after == 30
        assert backend.calls == 4  # nothing reached the backend while open
        assert pipeline.stats.circuit_open == 10

        clock.now += 30  # the open period is over: the next call is a probe
        backend.failing = False
        assert breaker.state == "half-open"
        assert pipeline.submit("p").result(10).text == "healthy"
        assert breaker.state == "closed"
        assert [pipeline.submit("p").result(10).text for _ in range(3)] == ["healthy"] * 3
    assert backend.calls == 8


def test_a_failed_probe_reopens() -> None:
    """A half-open probe that fails opens the breaker for another full period."""
    clock = Clock(1000.0)
    breaker = CircuitBreaker(window=2, min_calls=2, open_for=10, clock=clock)
    backend = Backend()
    with Pipeline(Engine(backend), breaker=breaker) as pipeline:
        for _ in range(2):
            with pytest.raises(UpstreamError):
                pipeline.submit("p").result(10)
        clock.now += 10
        with pytest.raises(UpstreamError):
            pipeline.submit("p").result(10)  # the probe
        assert breaker.state == "open"
        clock.now += 9
        with pytest.raises(CircuitOpen):
            pipeline.submit("p").result(10)
    assert backend.calls == 3


def test_half_open_admits_only_the_probes() -> None:
    """While a probe is in flight, other calls are refused."""
    clock = Clock(1000.0)
    breaker = CircuitBreaker(window=2, min_calls=2, open_for=5, half_open_probes=2, clock=clock)
    for _ in range(2):
        breaker.record(breaker.admit(), failed=True)
    clock.now += 5
    first, second = breaker.admit(), breaker.admit()
    assert first.probe
    assert second.probe
    with pytest.raises(CircuitOpen, match="probe"):
        breaker.admit()
    breaker.record(first, failed=False)
    assert breaker.state == "half-open"  # needs both probes
    breaker.record(second, failed=False)
    assert breaker.state == "closed"


def test_error_ratio_over_the_window() -> None:
    """It opens only once min_calls outcomes are in and the failure share reaches the ratio."""
    breaker = CircuitBreaker(window=10, min_calls=5, failure_ratio=0.5, clock=Clock(1000.0))
    for failed in (True, True, False, False):
        breaker.record(breaker.admit(), failed=failed)
    assert breaker.state == "closed"  # 4 < min_calls
    breaker.record(breaker.admit(), failed=False)
    assert breaker.state == "closed"  # 2/5 < 0.5
    breaker.record(breaker.admit(), failed=True)
    assert breaker.state == "open"  # 3/6


def test_slow_calls_open_the_breaker() -> None:
    """Calls whose time to first token exceeds slow_call_duration count as slow."""
    breaker = CircuitBreaker(
        window=4, min_calls=4, slow_call_ratio=0.75, slow_call_duration=1.0, clock=Clock(1000.0)
    )
    for duration in (0.1, 2.0, 3.0):
        breaker.record(breaker.admit(), failed=False, duration=duration)
    assert breaker.state == "closed"
    breaker.record(breaker.admit(), failed=False, duration=5.0)
    assert breaker.state == "open"


def test_outcomes_from_before_a_state_change_are_ignored() -> None:
    """A call admitted while closed that fails after the breaker reopened changes nothing."""
    clock = Clock(1000.0)
    breaker = CircuitBreaker(window=2, min_calls=2, open_for=5, clock=clock)
    stale = breaker.admit()
    for _ in range(2):
        breaker.record(breaker.admit(), failed=True)
    clock.now += 5
    probe = breaker.admit()
    breaker.record(stale, failed=True)
    assert breaker.state == "half-open"
    breaker.record(probe, failed=False)
    assert breaker.state == "closed"


def test_consumer_cancellations_do_not_count() -> None:
    """Cancelled requests are neither failures nor successes (released tickets)."""
    clock = Clock(1000.0)
    breaker = CircuitBreaker(window=2, min_calls=2, open_for=5, clock=clock)
    gate = threading.Event()

    def slow(prompt: str) -> str:
        gate.wait(10)
        return "x"

    with Pipeline(Engine(slow), breaker=breaker) as pipeline:
        streams = [pipeline.submit("p") for _ in range(5)]
        for s in streams:
            s.cancel()
            with pytest.raises(Cancelled):
                s.result(10)
        gate.set()
    assert breaker.state == "closed"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_ratio": 0},
        {"failure_ratio": 1.5},
        {"window": 0},
        {"window": 5, "min_calls": 6},
        {"open_for": -1},
        {"half_open_probes": 0},
        {"slow_call_ratio": 0.5},
        {"slow_call_ratio": 0.5, "slow_call_duration": 0},
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, float]) -> None:
    """Ratios outside (0, 1], empty windows and half-set slow-call options raise."""
    with pytest.raises(ValueError, match=r"must|go together|exceed"):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
