"""OpenTelemetry: one span per request, with the log line's fields (``llmbridge[otel]``).

Imported only when a bridge's ``tracing`` option is on (or :func:`enable_tracing` is
called): then each request's log record also becomes a server span named
``"METHOD route"``, parented to the request's incoming ``traceparent`` (W3C trace
context), spanning from when the integration first saw the request to the end of its
answer, with HTTP semantic-convention attributes and every log field as
``llmbridge.<field>``. The span is made at the end, from recorded times, so nothing
runs per token and no context has to follow the request across threads.
"""

from __future__ import annotations

import time
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'llmbridge tracing needs OpenTelemetry: pip install "llmbridge[otel]"'
    ) from exc

from . import reqlog

__all__ = ["disable_tracing", "enable_tracing"]

_propagator = TraceContextTextMapPropagator()


class _SpanRecorder:
    """Turns one ended request's fields into a finished span."""

    def __init__(self, tracer_provider: Any = None) -> None:
        self.tracer = trace.get_tracer("llmbridge", tracer_provider=tracer_provider)

    def __call__(self, fields: dict[str, Any], traceparent: str | None, started_ns: int) -> None:
        parent = None
        if traceparent:
            parent = _propagator.extract({"traceparent": traceparent})
        method = fields.get("method")
        route = fields.get("route")
        name = " ".join(part for part in (method, route) if part) or "llmbridge request"
        attributes: dict[str, Any] = {
            f"llmbridge.{key}": value for key, value in fields.items() if value is not None
        }
        if method:
            attributes["http.request.method"] = method
        if route:
            attributes["http.route"] = route
        status = fields.get("status")
        if status is not None:
            attributes["http.response.status_code"] = status
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=started_ns,
        )
        if isinstance(status, int) and status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=max(started_ns, time.time_ns()))


def enable_tracing(tracer_provider: Any = None) -> None:
    """Make a span of every request's log record from now on, in this process, with
    ``tracer_provider`` (default: OpenTelemetry's global one). Idempotent."""
    reqlog.tracer = _SpanRecorder(tracer_provider)


def disable_tracing() -> None:
    """Stop making spans (the log line stays)."""
    reqlog.tracer = None
