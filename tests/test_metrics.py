"""Prometheus metrics read from an engine and a pipeline at scrape time."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmbridge import BackendError
from llmbridge.metrics import LLMBridgeCollector
from llmbridge.policies import Pipeline
from llmbridge.testing import simulated_engine

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
