"""Rate limits per key: requests and tokens per minute, in process memory.

The Redis-shared form is in tests/test_redis_shared.py.
"""

from __future__ import annotations

import threading

import pytest

from llmbridge import Engine, RateLimited, Request
from llmbridge.policies import Pipeline, RateLimit
from llmbridge.testing import simulated_engine

pytestmark = pytest.mark.timeout(30)


class Counting:
    """A backend that answers its prompt and counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, prompt: str) -> str:
        with self.lock:
            self.calls += 1
        return prompt


def test_requests_per_minute_refuses_the_excess_with_retry_after() -> None:
    """5/minute admits five requests; the sixth fails with RateLimited (429) carrying a
    Retry-After within the minute, and never reaches the backend."""
    backend = Counting()
    with Pipeline(Engine(backend), rate_limit=RateLimit(requests_per_minute=5)) as pipeline:
        assert [pipeline.submit(f"r{i}").result(10).text for i in range(5)] == [
            f"r{i}" for i in range(5)
        ]
        with pytest.raises(RateLimited) as info:
            pipeline.submit("too many").wait_started(10)
    assert info.value.status == 429
    assert info.value.retry_after is not None
    assert 1 <= info.value.retry_after <= 60
    assert backend.calls == 5
    assert pipeline.stats.rate_limited == 1


def test_each_key_has_its_own_budget() -> None:
    """The key function splits budgets; a per-call key overrides it."""
    seen_threads: list[int] = []

    def by_user(request: Request) -> str:
        seen_threads.append(threading.get_ident())
        return str(request.params.get("user"))

    limit = RateLimit(requests_per_minute=2, key=by_user)
    with Pipeline(Engine(lambda prompt, user: prompt), rate_limit=limit) as pipeline:
        for user in ("ann", "bob"):
            for _ in range(2):
                pipeline.submit("hi", user=user).result(10)
        for user in ("ann", "bob"):
            with pytest.raises(RateLimited, match=user):
                pipeline.submit("hi", user=user).result(10)
        assert pipeline.submit("hi", user="ann", policy={"key": "cal"}).result(10).text == "hi"
    # The key function ran in the submitting thread (so it may read a request context).
    assert set(seen_threads) == {threading.get_ident()}


def test_tokens_per_minute_counts_what_the_backend_produced() -> None:
    """With 40 tokens/minute and 17-token requests (16 out, 1 in), the third request in
    the minute is refused; the overshoot fills the window."""
    engine = simulated_engine(step_time=0.0, max_new_tokens=16)
    limit = RateLimit(tokens_per_minute=40)
    with Pipeline(engine, rate_limit=limit) as pipeline:
        for i in range(3):
            completion = pipeline.submit(f"p{i}").result(10)
            assert completion.total_tokens == 17
        with pytest.raises(RateLimited, match="tokens per minute"):
            pipeline.submit("p3").result(10)


def test_cache_hits_spend_requests_but_not_tokens() -> None:
    """A cached answer passes the request limit first but charges no tokens."""
    engine = simulated_engine(step_time=0.0, max_new_tokens=16)
    limit = RateLimit(requests_per_minute=100, tokens_per_minute=20)
    with Pipeline(engine, rate_limit=limit, cache="memory") as pipeline:
        for _ in range(10):
            pipeline.submit("same", temperature=0).result(10)
    assert pipeline.stats.cache_hits == 9
    assert engine.backend.generator.enqueued == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs requests_per_minute"),
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"requests_per_minute": -5}, "requests_per_minute"),
        ({"tokens_per_minute": 1.5}, "tokens_per_minute"),
        ({"requests_per_minute": 1, "storage": "memcached://x"}, "storage"),
        ({"requests_per_minute": 1, "strategy": "leaky-bucket"}, "unknown strategy"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, object], match: str) -> None:
    """Missing or non-positive limits, unknown stores and strategies raise ValueError."""
    with pytest.raises(ValueError, match=match):
        RateLimit(**kwargs)  # type: ignore[arg-type]


def test_key_must_be_callable() -> None:
    """A key that is not a function is refused at construction."""
    with pytest.raises(TypeError, match="key"):
        RateLimit(requests_per_minute=1, key="user")  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["fixed-window", "sliding-window-counter"])
def test_other_strategies_enforce_the_limit(strategy: str) -> None:
    """Every supported ``limits`` strategy admits exactly the budget in a fresh window."""
    with Pipeline(
        Engine(str.upper), rate_limit=RateLimit(requests_per_minute=3, strategy=strategy)
    ) as pipeline:
        results = []
        for _ in range(5):
            try:
                results.append(pipeline.submit("x").result(10).text)
            except RateLimited:
                results.append("429")
    assert results == ["X", "X", "X", "429", "429"]
