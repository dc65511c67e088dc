"""Prometheus metrics read from an engine and a pipeline at scrape time."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmbridge import BackendError, Engine, Overloaded, RateLimited
from llmbridge.backends import StepBackend
from llmbridge.metrics import BUCKETS, LLMBridgeCollector, instrument
from llmbridge.policies import Pipeline
from llmbridge.testing import SimulatedGenerator, simulated_engine

from support import wait_until

pytestmark = pytest.mark.timeout(30)


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    """Samples by name, parsed back with prometheus_client's own text parser."""
    text = generate_latest(registry).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_engine_counters_and_gauges_are_exported() -> None:
    """Submitted, completed, failed, cancelled, steps, queued and in-flight are scraped."""
    registry = CollectorRegistry()
    with simulated_engine(step_time=0.001, max_new_tokens=3) as engine:
        registry.register(LLMBridgeCollector(engine, name="chat"))
        engine.submit("a").result(timeout=10)
        with pytest.raises(BackendError):
            engine.submit("b", error_after=1).result(timeout=10)
        long = engine.submit("c", max_new_tokens=100_000)
        long.wait_started(timeout=10)
        assert scrape(registry)["llmbridge_in_flight"] == 1
        long.cancel()
        assert wait_until(lambda: scrape(registry)["llmbridge_requests_cancelled_total"] == 1)
        samples = scrape(registry)
    assert samples["llmbridge_requests_submitted_total"] == 3
    assert samples["llmbridge_requests_completed_total"] == 1
    assert samples["llmbridge_requests_failed_total"] == 1
    assert samples["llmbridge_steps_total"] >= 3
    assert samples["llmbridge_queued"] == 0
    assert samples["llmbridge_in_flight"] == 0
    assert 'engine="chat"' in generate_latest(registry).decode()


def test_pipeline_counters_are_exported() -> None:
    """A pipeline's cache hits show up next to its engine's counters."""
    registry = CollectorRegistry()
    engine = simulated_engine(step_time=0.001, max_new_tokens=3)
    pipeline = Pipeline(engine, cache="memory")
    registry.register(LLMBridgeCollector(engine, pipeline=pipeline))
    try:
        for _ in range(3):
            pipeline.submit("same", temperature=0).result(timeout=10)
        samples = scrape(registry)
        assert samples["llmbridge_pipeline_requests_total"] == 3
        assert samples["llmbridge_pipeline_cache_hits_total"] == 2
        assert samples["llmbridge_requests_submitted_total"] == 1
    finally:
        pipeline.close()


def test_collector_needs_an_engine() -> None:
    """Passing something else fails at construction with a clear message."""
    with pytest.raises(TypeError, match="needs an Engine"):
        LLMBridgeCollector(object())  # type: ignore[arg-type]


# -- the llmbridge: histograms and counters, fed by the engine's observer ---------------

_engine_names = itertools.count(1)


def named_engine(**options: Any) -> Engine:
    """A simulated engine with a name of its own, so its labelled samples are its own."""
    engine = simulated_engine(step_time=0.001, max_new_tokens=3, **options)
    engine.name = f"obs-unit-{next(_engine_names)}"
    return engine


def sample(name: str, engine: Engine, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, {"engine": engine.name, **labels})
    return 0.0 if value is None else value


def test_outcomes_by_finish_reason() -> None:
    """length, stop, error, cancelled and rejected are each counted once per request."""
    engine = named_engine(max_queued=1, max_batch_size=1)
    (metrics,) = instrument(engine)
    assert engine.observer is metrics
    assert instrument(engine) == [metrics]  # idempotent
    outcomes = "llmbridge:request_outcomes_total"
    with engine:
        engine.submit("a").result(timeout=10)
        with pytest.raises(BackendError):
            engine.submit("b", error_after=1).result(timeout=10)
        long = engine.submit("c", max_new_tokens=100_000)
        long.wait_started(timeout=10)
        waiting = engine.submit("q")  # the one slot is taken: it waits in the queue
        with pytest.raises(Overloaded):
            engine.submit("d")
        waiting.cancel()
        long.cancel()
        assert wait_until(lambda: sample(outcomes, engine, finish_reason="cancelled") == 2)
    assert sample(outcomes, engine, finish_reason="length") == 1
    assert sample(outcomes, engine, finish_reason="error") == 1
    assert sample(outcomes, engine, finish_reason="rejected") == 1
    assert sample(outcomes, engine, finish_reason="stop") == 0
    # Latencies of finished requests only; a first token for each that produced text.
    assert sample("llmbridge:e2e_request_latency_seconds_count", engine) == 1
    assert sample("llmbridge:time_to_first_token_seconds_count", engine) == 3
    assert sample("llmbridge:num_requests_running", engine) == 0
    assert sample("llmbridge:num_requests_waiting", engine) == 0


def test_batch_size_per_step_adds_up_to_the_tokens() -> None:
    """Each simulated step gives one token to every job in it, so the batch sizes
    observed add up to the tokens generated, and there is one observation per step."""
    engine = named_engine()
    instrument(engine)
    with engine:
        streams = [engine.submit(f"p{i}", max_new_tokens=5) for i in range(6)]
        for stream in streams:
            stream.result(timeout=10)
        steps = engine.stats.steps
    assert sample("llmbridge:step_batch_size_sum", engine) == 30
    assert sample("llmbridge:step_batch_size_count", engine) == steps
    assert sample("llmbridge:generation_tokens_total", engine) == 30


def test_pipeline_requests_are_measured_once_and_refusals_are_rejected() -> None:
    """Through a Pipeline (the engine's own request, written by the backend job): a cache
    hit is one more finished request; a rate-limited one counts as rejected."""
    from llmbridge.policies import RateLimit

    engine = named_engine()
    instrument(engine)
    pipeline = Pipeline(
        engine, cache="memory", rate_limit=RateLimit(requests_per_minute=2, key=lambda r: "k")
    )
    outcomes = "llmbridge:request_outcomes_total"
    try:
        pipeline.submit("same", temperature=0).result(timeout=10)
        pipeline.submit("same", temperature=0).result(timeout=10)
        refused = None
        for i in range(3):
            try:
                pipeline.submit(f"other {i}", temperature=0).result(timeout=10)
            except RateLimited as exc:
                refused = exc
                break
        assert refused is not None
        assert wait_until(lambda: sample(outcomes, engine, finish_reason="rejected") == 1)
        assert sample("llmbridge:e2e_request_latency_seconds_count", engine) >= 2
    finally:
        pipeline.close()


class ReportingBackend:
    """A backend that reports gauges of its own, as the transformers backend does."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads = 0

    def serve(self, jobs: Any) -> None:
        self.inner.serve(jobs)

    def metrics(self) -> dict[str, float]:
        self.reads += 1
        return {"kv_cache_usage_ratio": 0.25, "gpu_memory_used_bytes": 1234.0}


def test_backend_gauges_come_from_its_metrics_hook() -> None:
    """backend.metrics() becomes llmbridge:<name> gauges, read on the engine thread."""
    inner = named_engine()
    engine = Engine(ReportingBackend(inner.backend), name=f"obs-unit-{next(_engine_names)}")
    instrument(engine)
    with engine:
        engine.submit("a").result(timeout=10)
    assert sample("llmbridge:kv_cache_usage_ratio", engine) == 0.25
    assert sample("llmbridge:gpu_memory_used_bytes", engine) == 1234.0


def test_a_failing_observer_never_fails_a_request(caplog: pytest.LogCaptureFixture) -> None:
    """An observer that raises is logged; requests go on."""

    class Broken:
        def request_admitted(self) -> None:
            raise RuntimeError("admitted")

        def request_rejected(self, error: BaseException) -> None:
            raise RuntimeError("rejected")

        def request_ended(self, channel: Any) -> None:
            raise RuntimeError("ended")

        def job_ended(self) -> None:
            raise RuntimeError("job ended")

        def step(self, batch_size: int) -> None:
            raise RuntimeError("step")

    engine = named_engine()
    engine.observer = Broken()
    with engine:
        assert engine.submit("a").result(timeout=10).completion_tokens == 3
    assert "observer" in caplog.text


def test_buckets_are_documented() -> None:
    """docs/howto/metrics.md lists every metric, and every bucket of each histogram."""
    doc = (Path(__file__).parent.parent / "docs" / "howto" / "metrics.md").read_text()
    for name, buckets in BUCKETS.items():
        assert f"`llmbridge:{name}`" in doc, name
        assert ", ".join(f"{b:g}" for b in buckets) in doc, name
    for metric in REGISTRY.collect():
        if metric.name.startswith("llmbridge:") and metric.name not in {
            "llmbridge:kv_cache_usage_ratio",
            "llmbridge:gpu_memory_used_bytes",
        }:
            shown = metric.name + ("_total" if metric.type == "counter" else "")
            assert f"`{shown}`" in doc, shown


def test_a_step_generators_metrics_hook_is_read_too() -> None:
    """A StepBackend's generator with metrics() (as TransformersGenerator on CUDA)
    reports through the same gauges."""

    class Reporting(SimulatedGenerator):
        def metrics(self) -> dict[str, float]:
            return {"gpu_memory_used_bytes": 99.0}

    generator = Reporting(step_time=0.001, max_new_tokens=2)
    engine = Engine(
        StepBackend(generator, generator.make_job), name=f"obs-unit-{next(_engine_names)}"
    )
    instrument(engine)
    with engine:
        engine.submit("a").result(timeout=10)
    assert sample("llmbridge:gpu_memory_used_bytes", engine) == 99.0
