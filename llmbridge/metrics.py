"""Prometheus metrics for engines and pipelines (``pip install "llmbridge[metrics]"``).

Two ways in. The bridges instrument their engines and serve ``/metrics`` by themselves
(the ``metrics_path`` option): latency histograms, token counters and gauges named as
vLLM names them, under an ``llmbridge:`` prefix, correct under ``gunicorn -w N`` through
prometheus-client's multiprocess mode (see ``docs/howto/metrics.md``). Without a bridge,
:func:`instrument` an engine and serve :func:`render_metrics` yourself.

:class:`LLMBridgeCollector` is a ``prometheus_client`` collector that reads the counters
an :class:`~llmbridge.Engine` (and a :class:`~llmbridge.policies.Pipeline`) already keep,
at scrape time: nothing is added to the request path.

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> from llmbridge.testing import simulated_engine
>>> registry = CollectorRegistry()
>>> engine = simulated_engine()
>>> _ = registry.register(LLMBridgeCollector(engine, name="chat"))
>>> b"llmbridge_requests_submitted_total" in generate_latest(registry)
True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'llmbridge.metrics needs prometheus-client: pip install "llmbridge[metrics]"'
    ) from exc

from ._core.engine import Engine
from ._web.metrics import BUCKETS, EngineMetrics, instrument, render_metrics

__all__ = ["BUCKETS", "EngineMetrics", "LLMBridgeCollector", "instrument", "render_metrics"]

_ENGINE_COUNTERS = {
    "submitted": "Requests the engine thread took from its queue.",
    "completed": "Requests that finished successfully.",
    "failed": "Requests that ended with an error.",
    "cancelled": "Requests cancelled by their consumer, a deadline or a shutdown.",
    "rejected": "Submits refused at once because max_queued requests waited.",
    "steps": "Backend steps (step generators: iterate() calls).",
}


class LLMBridgeCollector(Collector):
    """Exposes an engine's counters and gauges, and a pipeline's if given, labelled ``name``.

    Metrics: ``llmbridge_requests_<state>_total`` counters (every submitted request ends
    in exactly one of completed, failed, cancelled; ``rejected`` were never submitted),
    ``llmbridge_steps_total``,
    ``llmbridge_queued`` (waiting for a backend slot), ``llmbridge_in_flight``; for a
    backend with upstreams (:class:`~llmbridge.backends.OpenAIBackend`) its limits
    (``llmbridge_backend_limit{limit="max_concurrency"|"max_connections"|...}``) and per
    upstream ``llmbridge_upstream_requests_total``, ``..._failures_total``,
    ``..._failovers_total``, ``llmbridge_upstream_outstanding``,
    and ``llmbridge_upstream_cooling_down``; and for a pipeline
    ``llmbridge_pipeline_<counter>_total`` (cache hits, coalesced requests, rate-limited,
    ...). ``collect()`` only reads counters: thread-safe, never blocks.
    """

    def __init__(self, engine: Engine, *, name: str | None = None, pipeline: Any = None) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"LLMBridgeCollector needs an Engine, got {type(engine).__name__}")
        self.engine = engine
        self.pipeline = pipeline
        self.name = name or engine.name

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Yield the current values (called by ``prometheus_client`` on each scrape)."""
        labels = ["engine"]
        stats = self.engine.stats.as_dict()
        for key, help_text in _ENGINE_COUNTERS.items():
            metric = "llmbridge_steps" if key == "steps" else f"llmbridge_requests_{key}"
            counter = CounterMetricFamily(metric, help_text, labels=labels)
            counter.add_metric([self.name], stats[key])
            yield counter
        queued = GaugeMetricFamily(
            "llmbridge_queued", "Requests admitted, waiting for a backend slot.", labels=labels
        )
        queued.add_metric([self.name], self.engine.queued)
        yield queued
        in_flight = GaugeMetricFamily(
            "llmbridge_in_flight", "Requests the backend is working on.", labels=labels
        )
        in_flight.add_metric([self.name], self.engine.in_flight)
        yield in_flight
        yield from self._backend_metrics()
        if self.pipeline is not None:
            for key, value in self.pipeline.stats.as_dict().items():
                counter = CounterMetricFamily(
                    f"llmbridge_pipeline_{key}",
                    f"Pipeline counter {key.replace('_', ' ')}.",
                    labels=labels,
                )
                counter.add_metric([self.name], value)
                yield counter

    def _backend_metrics(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = getattr(self.engine.backend, "stats", None)
        if not isinstance(stats, dict) or not isinstance(stats.get("upstreams"), list):
            return
        limits = GaugeMetricFamily(
            "llmbridge_backend_limit",
            "The backend's configured limits (requests in flight, pool connections).",
            labels=["engine", "limit"],
        )
        for key in (
            "max_concurrency",
            "max_connections",
        ):
            if isinstance(stats.get(key), int):
                limits.add_metric([self.name, key], stats[key])
        yield limits
        labels = ["engine", "upstream"]
        families: list[tuple[str, str, type[CounterMetricFamily | GaugeMetricFamily]]] = [
            (
                "requests",
                "Requests sent to the upstream (failovers included).",
                CounterMetricFamily,
            ),
            ("failures", "Requests that failed on the upstream's side.", CounterMetricFamily),
            ("failovers", "Requests moved from this upstream to another.", CounterMetricFamily),
            ("outstanding", "Requests in flight to the upstream.", GaugeMetricFamily),
            (
                "cooling_down",
                "1 while the upstream's breaker keeps requests away.",
                GaugeMetricFamily,
            ),
        ]
        for key, help_text, family in families:
            metric = family(f"llmbridge_upstream_{key}", help_text, labels=labels)
            for upstream in stats["upstreams"]:
                metric.add_metric([self.name, str(upstream["name"])], float(upstream[key]))
            yield metric
