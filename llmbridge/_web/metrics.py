"""Latency histograms, token counters and gauges in prometheus-client, per engine.

The metrics are defined once per process on prometheus-client's default registry, with
the field's names (vLLM's) under an ``llmbridge:`` prefix and one label, ``engine``.
:class:`EngineMetrics` is the engine's :class:`~llmbridge._core.observe.Observer` that
feeds them; :func:`render_metrics` is what a ``/metrics`` route answers.

Only the metric types prometheus-client's multiprocess mode supports are used (counters,
histograms, gauges with a ``multiprocess_mode``; no custom collector), so under
``gunicorn -w N`` with ``PROMETHEUS_MULTIPROC_DIR`` set every worker writes its own
files and one scrape of any worker sums them. Exemplars are not used: multiprocess mode
drops them, and the request id is in the log line (and the span) instead.

Importing this module imports ``prometheus_client``; nothing else in the package does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
        multiprocess,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'llmbridge metrics need prometheus-client: pip install "llmbridge[metrics]"'
    ) from exc

from .._core.channel import Channel
from .._core.engine import Engine
from .._exceptions import Cancelled, CircuitOpen, Overloaded, RateLimited
from .drain import engines_of

__all__ = [
    "BUCKETS",
    "EngineMetrics",
    "instrument",
    "multiprocess_dir",
    "render_metrics",
]

logger = logging.getLogger("llmbridge")

#: Histogram buckets (seconds, or requests for the batch size), chosen for LLM serving:
#: first tokens from a few ms (a cache hit, a small local model) to tens of seconds (a
#: long prompt on a busy GPU), token gaps from 1 ms to a second, whole answers up to ten
#: minutes.
# fmt: off
BUCKETS: dict[str, tuple[float, ...]] = {
    "time_to_first_token_seconds": (
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
        1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    ),
    "inter_token_latency_seconds": (
        0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
        0.075, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5,
    ),
    "e2e_request_latency_seconds": (
        0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
        45.0, 60.0, 120.0, 300.0, 600.0,
    ),
    "request_queue_time_seconds": (
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ),
    "step_batch_size": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
}
# fmt: on

#: Finish reasons kept as label values; a backend's other words count as ``"other"``.
_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "cancelled", "error"})
#: Errors that mean "refused, try later" (429/503 before any work): ``"rejected"``.
_REFUSALS = (Overloaded, RateLimited, CircuitOpen)

_LABELS = ("engine",)


def _histogram(name: str, doc: str) -> Histogram:
    return Histogram(f"llmbridge:{name}", doc, _LABELS, buckets=BUCKETS[name])


TIME_TO_FIRST_TOKEN = _histogram(
    "time_to_first_token_seconds", "Seconds from submission to the first generated text."
)
INTER_TOKEN_LATENCY = _histogram(
    "inter_token_latency_seconds",
    "Mean seconds between two generated tokens of a finished request (one per request).",
)
E2E_LATENCY = _histogram(
    "e2e_request_latency_seconds", "Seconds from submission to the end of a finished request."
)
QUEUE_TIME = _histogram(
    "request_queue_time_seconds", "Seconds a request waited for a backend slot."
)
BATCH_SIZE = _histogram("step_batch_size", "Requests served by one backend step or batch.")
PROMPT_TOKENS = Counter("llmbridge:prompt_tokens", "Prompt tokens of ended requests.", _LABELS)
GENERATION_TOKENS = Counter(
    "llmbridge:generation_tokens", "Tokens generated for ended requests.", _LABELS
)
OUTCOMES = Counter(
    "llmbridge:request_outcomes",
    "Requests by how they ended: stop, length, cancelled, error, rejected, ...",
    (*_LABELS, "finish_reason"),
)
RUNNING = Gauge(
    "llmbridge:num_requests_running",
    "Requests the backend is working on.",
    _LABELS,
    multiprocess_mode="livesum",
)
WAITING = Gauge(
    "llmbridge:num_requests_waiting",
    "Requests admitted, waiting for a backend slot.",
    _LABELS,
    multiprocess_mode="livesum",
)

# Gauges a backend reports through ``backend.metrics()``, made on first sight of a key.
_backend_gauges: dict[str, Gauge] = {}
_backend_gauges_lock = threading.Lock()

#: How often (seconds) a backend's own ``metrics()`` is read, at most.
BACKEND_METRICS_INTERVAL = 1.0
#: How often (seconds) steps refresh the running and waiting gauges, at most.
GAUGES_INTERVAL = 0.05


def _backend_gauge(key: str) -> Gauge | None:
    gauge = _backend_gauges.get(key)
    if gauge is None:
        name = f"llmbridge:{key}"
        with _backend_gauges_lock:
            gauge = _backend_gauges.get(key)
            if gauge is None:
                try:
                    gauge = Gauge(
                        name,
                        f"Reported by the backend's metrics(): {key}.",
                        _LABELS,
                        multiprocess_mode="liveall",
                    )
                except ValueError:  # a bad or clashing name: say so once, skip it
                    logger.warning("backend metric %r can't be exported as %s", key, name)
                    _backend_gauges[key] = gauge = None  # type: ignore[assignment]
                    return None
                _backend_gauges[key] = gauge
    return gauge


class EngineMetrics:
    """The observer that feeds the ``llmbridge:`` metrics from one engine.

    Set as ``engine.observer`` by :func:`instrument`. Each request is measured once, at
    its end (whatever thread ended it): time to first token if it produced text, queue
    time if a backend slot took it, end-to-end latency and mean inter-token latency if it
    finished (not cancelled or failed), its tokens, and its outcome. Each step observes
    its batch size and refreshes the running and waiting gauges, and at most once a second
    the backend's own ``metrics()`` gauges. Thread-safe; never blocks.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        name = engine.name
        # Children bound once: the label lookup is not on each request's path.
        self._ttft = TIME_TO_FIRST_TOKEN.labels(name)
        self._itl = INTER_TOKEN_LATENCY.labels(name)
        self._e2e = E2E_LATENCY.labels(name)
        self._queue = QUEUE_TIME.labels(name)
        self._batch = BATCH_SIZE.labels(name)
        self._prompt = PROMPT_TOKENS.labels(name)
        self._generated = GENERATION_TOKENS.labels(name)
        self._running = RUNNING.labels(name)
        self._waiting = WAITING.labels(name)
        self._outcomes = {reason: OUTCOMES.labels(name, reason) for reason in _REASONS}
        self._outcomes["rejected"] = OUTCOMES.labels(name, "rejected")
        self._outcomes["other"] = OUTCOMES.labels(name, "other")
        # The backend's own gauges, or its step generator's (a StepBackend's).
        backend = engine.backend
        reporter = getattr(backend, "metrics", None)
        if not callable(reporter):
            reporter = getattr(getattr(backend, "generator", None), "metrics", None)
        self._backend_metrics = reporter if callable(reporter) else None
        self._next_backend_read = 0.0
        self._next_gauges = 0.0

    def __repr__(self) -> str:
        return f"<EngineMetrics {self.engine.name!r}>"

    def _gauges(self) -> None:
        # This process's own figures, never another's: they are read on the request
        # path (an EngineClient's ``queued`` is a call to the engine process), and
        # multiprocess gauges add up the workers'. Host-wide: LLMBridgeCollector.
        running, waiting = self.engine.local_load()
        self._running.set(running)
        self._waiting.set(waiting)

    def request_admitted(self) -> None:
        """A request was queued: refresh the waiting gauge."""
        self._waiting.set(self.engine.local_load()[1])

    def job_ended(self) -> None:
        """A backend job ended (or left the queue unstarted): refresh both gauges."""
        self._gauges()

    def request_rejected(self, error: BaseException) -> None:
        """A submit was refused at once: count it ``rejected``."""
        self._outcomes["rejected"].inc()

    def request_ended(self, channel: Channel) -> None:
        """Measure one ended request."""
        outcome = channel.outcome()
        error = outcome.error
        if error is None:
            reason = outcome.finish_reason
            if reason not in _REASONS:
                reason = "other"
        elif isinstance(error, Cancelled):
            reason = "cancelled"
        elif isinstance(error, _REFUSALS):
            reason = "rejected"
        else:
            reason = "error"
        self._outcomes[reason].inc()
        if outcome.time_to_first_token is not None:
            self._ttft.observe(outcome.time_to_first_token)
        if outcome.queued is not None:
            self._queue.observe(outcome.queued)
        if error is None:
            self._e2e.observe(outcome.total)
            itl = outcome.inter_token_latency
            if itl is not None:
                self._itl.observe(itl)
        if outcome.prompt_tokens:
            self._prompt.inc(outcome.prompt_tokens)
        if outcome.completion_tokens:
            self._generated.inc(outcome.completion_tokens)
        # The gauges: job_ended() sets them, once the backend job is gone too.

    def step(self, batch_size: int) -> None:
        """One backend step of ``batch_size`` requests."""
        self._batch.observe(batch_size)
        # The gauges change at admission and at each end, where they are set; here they
        # only catch requests starting, so a few times a second is enough.
        now = time.monotonic()
        if now >= self._next_gauges:
            self._next_gauges = now + GAUGES_INTERVAL
            self._gauges()
        if self._backend_metrics is not None and now >= self._next_backend_read:
            self._next_backend_read = now + BACKEND_METRICS_INTERVAL
            self.read_backend_metrics()

    def read_backend_metrics(self) -> None:
        """Copy the backend's ``metrics()`` (``{name: value}``) into ``llmbridge:<name>``
        gauges now. Never raises: a failing ``metrics()`` is logged."""
        reporter = self._backend_metrics
        if reporter is None:
            return
        try:
            values: dict[str, float] = reporter()
        except Exception:
            logger.exception("%s: backend metrics() failed", self.engine.name)
            return
        for key, value in values.items():
            gauge = _backend_gauge(key)
            if gauge is not None:
                gauge.labels(self.engine.name).set(value)


def instrument(*sources: Any) -> list[EngineMetrics]:
    """Feed the ``llmbridge:`` metrics from every engine reachable from ``sources``
    (engines, pipelines, bridges, apps). Idempotent: an engine already instrumented keeps
    its :class:`EngineMetrics`; one with another observer is left alone (logged). Returns
    the engines' metrics. Never blocks; call it before the engines serve."""
    found: list[EngineMetrics] = []
    for engine in _engines(*sources):
        observer = engine.observer
        if isinstance(observer, EngineMetrics):
            found.append(observer)
        elif observer is None:
            metrics = EngineMetrics(engine)
            engine.observer = metrics
            found.append(metrics)
        else:
            logger.warning("%s already has observer %r: not instrumented", engine.name, observer)
    return found


def _engines(*sources: Any) -> list[Engine]:
    """The :class:`Engine` objects behind ``sources``: engines, submitters wrapping one
    in ``.engine`` (a Pipeline), and what bridges and apps hold (``engines_of``)."""
    found: list[Engine] = []
    for candidate in engines_of(*sources):
        for _ in range(5):  # a submitter over a submitter over an engine, not forever
            if isinstance(candidate, Engine):
                if all(candidate is not e for e in found):
                    found.append(candidate)
                break
            candidate = getattr(candidate, "engine", None)
            if candidate is None:
                break
    return found


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, if this process uses it."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render_metrics(registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """The exposition text of ``registry`` and its content type: by default every
    worker's metrics merged (multiprocess mode), else this process's default registry.
    Blocks briefly (multiprocess mode reads one file per worker): run it off a loop."""
    if registry is None:
        if multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
