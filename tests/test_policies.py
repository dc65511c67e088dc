"""The pipeline: policy composition, per-call options, the cache, bad configuration."""

from __future__ import annotations

import threading

import pytest

import llmbridge.policies
from llmbridge import (
    BadRequest,
    CircuitOpen,
    Engine,
    RateLimited,
    Submitter,
    Timeout,
    UpstreamError,
)
from llmbridge.policies import (
    CallOptions,
    CircuitBreaker,
    MemoryCache,
    Pipeline,
    RateLimit,
    Retry,
    Timeouts,
)
from llmbridge.testing import simulated_engine

from support import Clock

pytestmark = pytest.mark.timeout(30)


def test_public_module_all_is_sorted_and_documented() -> None:
    """llmbridge.policies exports a sorted __all__ of documented names."""
    names = llmbridge.policies.__all__
    assert names == sorted(names)
    for name in names:
        assert getattr(llmbridge.policies, name).__doc__, name


def test_a_pipeline_is_a_submitter_with_the_engine_surface() -> None:
    """Integrations take it like an engine: submit, start, close, context managers."""
    engine = simulated_engine(step_time=0.0, max_new_tokens=4)
    pipeline = Pipeline(engine, cache="memory")
    assert isinstance(pipeline, Submitter)
    assert pipeline.start() is pipeline
    assert engine.running
    with pipeline:
        assert pipeline.submit("p", seed=1).result(10).text
    assert not engine.running


def test_no_policies_is_a_passthrough() -> None:
    """Without policies, submit returns the engine's own stream (no extra hop)."""
    with Pipeline(Engine(str.upper)) as pipeline:
        stream = pipeline.submit("abc")
        assert stream.id.startswith("req-")
        assert stream.result(10).text == "ABC"


def test_backend_params_pass_through_untouched() -> None:
    """Every keyword but ``policy`` reaches the backend, including odd names."""
    seen: list[dict[str, object]] = []

    def backend(prompt: str, **params: object) -> str:
        seen.append(params)
        return "ok"

    with Pipeline(Engine(backend), retry=2) as pipeline:
        pipeline.submit("p", options={"num_ctx": 4}, temperature=0.3, key="k").result(10)
    assert seen == [{"options": {"num_ctx": 4}, "temperature": 0.3, "key": "k"}]


def test_cache_replays_a_stream_whole() -> None:
    """A deterministic request's answer is stored whole and replayed as a stream with
    the same text and token counts, without the backend."""
    engine = simulated_engine(step_time=0.001, max_new_tokens=12)
    generator = engine.backend.generator
    with Pipeline(engine, cache="memory") as pipeline:
        first = pipeline.submit("p", temperature=0).result(10)
        chunks = list(pipeline.submit("p", temperature=0))
        second = pipeline.submit("p", temperature=0).result(10)
    assert "".join(chunks) == first.text == second.text == generator.expected_text("p")
    assert (second.prompt_tokens, second.completion_tokens) == (1, 12)
    assert generator.enqueued == 1
    assert pipeline.stats.cache_hits == 2


def test_nondeterministic_requests_are_not_cached_unless_opted_in() -> None:
    """Sampling requests go to the backend every time, unless the call opts in."""
    engine = simulated_engine(step_time=0.0, max_new_tokens=4)
    generator = engine.backend.generator
    with Pipeline(engine, cache="memory") as pipeline:
        for _ in range(3):
            pipeline.submit("p", temperature=0.9).result(10)
        assert generator.enqueued == 3
        for _ in range(3):
            pipeline.submit("p", temperature=0.9, policy={"cache_nondeterministic": True}).result(
                10
            )
        assert generator.enqueued == 4


def test_no_cache_and_no_store() -> None:
    """no_cache skips the lookup but stores; no_store looks up but never stores."""
    cache = MemoryCache()
    engine = simulated_engine(step_time=0.0, max_new_tokens=4)
    generator = engine.backend.generator
    with Pipeline(engine, cache=cache) as pipeline:
        pipeline.submit("a", temperature=0, policy={"no_store": True}).result(10)
        assert len(cache) == 0
        pipeline.submit("a", temperature=0).result(10)
        assert generator.enqueued == 2
        assert len(cache) == 1
        pipeline.submit("a", temperature=0, policy=CallOptions(no_cache=True)).result(10)
        assert generator.enqueued == 3
        pipeline.submit("a", temperature=0, policy=CallOptions(no_store=True)).result(10)
        assert generator.enqueued == 3  # a hit: no_store doesn't stop reading


def test_cache_control_header_maps_to_options() -> None:
    """``Cache-Control: no-cache, no-store, max-age=N`` maps to the call options."""
    options = CallOptions.from_cache_control("No-Cache, no-store, max-age=30", key="u")
    assert (options.no_cache, options.no_store, options.cache_ttl, options.key) == (
        True,
        True,
        30.0,
        "u",
    )
    assert CallOptions.from_cache_control(None) == CallOptions()


def test_namespaces_keep_tenants_apart() -> None:
    """The same request under two namespaces is cached twice."""
    engine = simulated_engine(step_time=0.0, max_new_tokens=4)
    with Pipeline(engine, cache="memory") as pipeline:
        for tenant in ("a", "b", "a", "b"):
            pipeline.submit("p", temperature=0, policy={"namespace": tenant}).result(10)
    assert engine.backend.generator.enqueued == 2


def test_params_without_json_form_are_served_uncached() -> None:
    """A request holding an object parameter still works; it just isn't cached."""
    calls: list[object] = []

    def backend(prompt: str, temperature: float, stopper: object) -> str:
        calls.append(stopper)
        return "x"

    with Pipeline(Engine(backend), cache="memory", single_flight=True) as pipeline:
        for _ in range(2):
            pipeline.submit("p", temperature=0, stopper=object()).result(10)
    assert len(calls) == 2


def test_an_open_breaker_still_serves_cached_answers() -> None:
    """Cache sits before the breaker: known answers survive a failing backend."""
    fail = threading.Event()

    def backend(prompt: str, temperature: float) -> str:
        if fail.is_set():
            raise UpstreamError("down", upstream_status=500)
        return prompt.upper()

    breaker = CircuitBreaker(window=2, min_calls=2, failure_ratio=1.0, open_for=60, clock=Clock())
    with Pipeline(Engine(backend), cache="memory", breaker=breaker) as pipeline:
        assert pipeline.submit("known", temperature=0).result(10).text == "KNOWN"
        fail.set()
        for prompt in ("x", "y"):
            with pytest.raises(UpstreamError):
                pipeline.submit(prompt, temperature=0).result(10)
        with pytest.raises(CircuitOpen):
            pipeline.submit("z", temperature=0).result(10)
        assert pipeline.submit("known", temperature=0).result(10).text == "KNOWN"


def test_rate_limit_comes_before_everything() -> None:
    """A rate-limited request is refused before the cache, breaker or backend see it."""
    engine = simulated_engine(step_time=0.0, max_new_tokens=4)
    with Pipeline(
        engine, rate_limit=RateLimit(requests_per_minute=1), cache="memory", retry=3
    ) as pipeline:
        pipeline.submit("p", temperature=0).result(10)
        with pytest.raises(RateLimited):
            pipeline.submit("p", temperature=0).result(10)
    assert pipeline.stats.cache_hits == 0
    assert pipeline.stats.cache_misses == 1


def test_retries_count_once_for_the_breaker() -> None:
    """The breaker sits outside the retry layer: a request that needed retries is one
    outcome (a success here), not several failures."""
    attempts = 0

    def flaky(prompt: str) -> str:
        nonlocal attempts
        attempts += 1
        if attempts % 3:
            raise UpstreamError("blip", retryable=True)
        return "ok"

    breaker = CircuitBreaker(window=2, min_calls=2, clock=Clock())
    retry = Retry(attempts=3, initial=0.001, max_backoff=0.002)
    with Pipeline(Engine(flaky), breaker=breaker, retry=retry) as pipeline:
        for _ in range(4):
            assert pipeline.submit("p").result(10).text == "ok"
    assert attempts == 12
    assert breaker.state == "closed"


def test_total_timeout_bounds_retries() -> None:
    """Retries stop at the total deadline, which surfaces as the last error or Timeout."""

    def always_busy(prompt: str) -> str:
        raise UpstreamError("busy", retryable=True, retry_after=0.05)

    retry = Retry(attempts=1000, initial=0.05, max_backoff=0.05)
    with (
        Pipeline(Engine(always_busy), retry=retry, timeouts=Timeouts(total=0.3)) as pipeline,
        pytest.raises((UpstreamError, Timeout)),
    ):
        pipeline.submit("p").result(10)
    assert pipeline.stats.backend_calls < 20


def test_from_config_builds_every_policy() -> None:
    """Plain settings (as from a Flask config) build the same pipeline."""
    engine = simulated_engine(step_time=0.0, max_new_tokens=4)
    pipeline = Pipeline.from_config(
        engine,
        {
            "rate_limit": {"requests_per_minute": 100},
            "cache": {"backend": "memory", "max_entries": 10, "ttl": 60},
            "single_flight": True,
            "breaker": {"failure_ratio": 0.5, "window": 10, "min_calls": 5},
            "retry": {"attempts": 2},
            "timeouts": {"total": 30},
            "namespace": "app",
        },
    )
    with pipeline:
        assert pipeline.submit("p", seed=1).result(10).text
    assert isinstance(pipeline.cache, MemoryCache)
    assert pipeline.cache.max_entries == 10
    assert pipeline.timeouts == Timeouts(total=30)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"chache": "memory"}, "unknown policy 'chache' \\(did you mean 'cache'\\?\\)"),
        ({"rate_limit": {"requests_per_minute": -1}}, "bad rate_limit settings"),
        ({"rate_limit": {"rpm": 5}}, "bad rate_limit settings.*rpm"),
        ({"cache": "memcached"}, "unknown cache 'memcached'"),
        ({"cache": {"backend": "disk"}}, "unknown cache backend 'disk'"),
        ({"cache": {"backend": "memory", "max_entries": -3}}, "max_entries"),
        ({"cache": {"backend": "redis"}}, "needs a url"),
        ({"breaker": {"window": 0}}, "window"),
        ({"retry": {"attempts": 0}}, "attempts"),
        ({"timeouts": {"total": -1}}, "total"),
    ],
)
def test_bad_configuration_fails_at_construction(config: dict[str, object], match: str) -> None:
    """Unknown policy names, negative sizes and unknown backends fail with a clear message."""
    engine = Engine(str.upper)
    with pytest.raises(ValueError, match=match):
        Pipeline.from_config(engine, config)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_limit": {"requests_per_minute": 1}},
        {"breaker": "on"},
        {"retry": "3"},
        {"timeouts": 5},
        {"single_flight": "yes"},
        {"cache": 42},
    ],
)
def test_wrong_types_fail_at_construction(kwargs: dict[str, object]) -> None:
    """Passing raw values where policy objects belong raises TypeError."""
    with pytest.raises(TypeError):
        Pipeline(Engine(str.upper), **kwargs)  # type: ignore[arg-type]


def test_wrapping_something_that_is_not_a_submitter() -> None:
    """Only a submitter can be wrapped."""
    with pytest.raises(TypeError, match="submitter"):
        Pipeline(str.upper)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        ({"no_cahce": True}, "unknown policy option 'no_cahce' \\(did you mean 'no_cache'\\?\\)"),
        ({"cache_ttl": -1}, "cache_ttl"),
        ({"key": 5}, "key"),
        ({"timeouts": {"total": 0}}, "total"),
        ("no-cache", "policy= takes CallOptions or a dict"),
    ],
)
def test_bad_call_options_are_bad_requests(policy: object, match: str) -> None:
    """A bad ``policy=`` raises BadRequest (400) at submit, before anything runs."""
    with Pipeline(Engine(str.upper), cache="memory") as pipeline:
        with pytest.raises(BadRequest, match=match):
            pipeline.submit("p", policy=policy)  # type: ignore[arg-type]
        with pytest.raises(BadRequest, match="prompt must be a str"):
            pipeline.submit(b"bytes")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_async_consumers_and_aclose() -> None:
    """A coroutine reads a pipeline's streams with async for; aclose closes the engine."""
    engine = simulated_engine(step_time=0.001, max_new_tokens=8)
    generator = engine.backend.generator
    async with Pipeline(engine, cache="memory", retry=2) as pipeline:
        for _ in range(2):
            stream = pipeline.submit("p", seed=4)
            await stream.await_started()
            text = "".join([chunk async for chunk in stream])
            assert text == generator.expected_text("p", seed=4)
    assert not engine.running
    assert pipeline.stats.cache_hits == 1
