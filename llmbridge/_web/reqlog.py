"""One log line (and, with OpenTelemetry, one span) per HTTP request, at its end.

An integration makes a :class:`RequestRecord` while the framework's request is current
(it holds what is only readable then: method, route, the principal's key id, the
incoming ``traceparent``), attaches the request's :class:`~llmbridge.Stream` when it
submits, and calls :meth:`RequestRecord.finish` once the answer is complete: at once for
a whole answer or an error, when the body closes for a stream. The line goes to the
``llmbridge.request`` logger at INFO with the fields of
:func:`~llmbridge._sansio.reqlog.request_fields` as ``extra=``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .._core.stream import Stream
from .._exceptions import RateLimited
from .._sansio.problem import problem_status
from .._sansio.reqlog import request_fields, request_message

__all__ = ["LOGGER", "PRINCIPAL_ATTR", "RECORD_KEY", "RequestRecord", "current_record", "tracer"]

#: The logger of the per-request line.
LOGGER = logging.getLogger("llmbridge.request")

#: The OpenTelemetry span maker, once :mod:`llmbridge._web.tracing` was enabled.
tracer: Any = None


class RequestRecord:
    """What one HTTP request's log line says. Not thread-safe: one request's threads
    use it in turn (the view's, then the server's that closes the body)."""

    __slots__ = (
        "__weakref__",
        "deferred",
        "error",
        "finished",
        "key_id",
        "method",
        "route",
        "started_ns",
        "status",
        "stream",
        "traceparent",
    )

    def __init__(
        self,
        method: str | None,
        route: str | None,
        *,
        key_id: str | None = None,
        traceparent: str | None = None,
    ) -> None:
        self.method = method
        self.route = route
        self.key_id = key_id
        self.traceparent = traceparent
        self.started_ns = time.time_ns()
        self.stream: Stream | None = None
        self.status: int | None = None
        self.error: BaseException | None = None
        #: True once a streamed body will call :meth:`finish` when it closes.
        self.deferred = False
        self.finished = False

    def finish(self, status: int | None = None, request_id: str | None = None) -> None:
        """Log the line (and end the span) now. Idempotent; never raises."""
        if self.finished:
            return
        self.finished = True
        if status is not None:
            self.status = status
        if not LOGGER.isEnabledFor(logging.INFO) and tracer is None:
            return
        try:
            self._emit(request_id)
        except Exception:  # the log line must never break an answer
            logging.getLogger("llmbridge").exception("writing the request log line failed")

    def _emit(self, request_id: str | None) -> None:
        stream = self.stream
        status = self.status
        if stream is None:
            fields = request_fields(
                request_id=request_id,
                method=self.method,
                route=self.route,
                status=status,
                rate_limited=isinstance(self.error, RateLimited),
                key_id=self.key_id,
            )
        else:
            outcome = stream.channel.outcome()
            error = outcome.error
            if error is not None and outcome.time_to_first_token is None and self.deferred:
                # Failed before any text while a server awaited the first output itself:
                # it answered the problem status, not the 200 the view returned.
                status = problem_status(error)
            fields = request_fields(
                request_id=outcome.id,
                method=self.method,
                route=self.route,
                status=status,
                queued=outcome.queued,
                time_to_first_token=outcome.time_to_first_token,
                total=outcome.total,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                finish_reason=outcome.finish_reason,
                cancelled=outcome.finish_reason == "cancelled",
                notes=outcome.notes,
                rate_limited=isinstance(error or self.error, RateLimited),
                key_id=self.key_id,
            )
        if LOGGER.isEnabledFor(logging.INFO):
            # makeRecord + handle is what info() does, less its stack walk for the
            # caller's file and line, which would only ever name this function.
            record = LOGGER.makeRecord(
                LOGGER.name, logging.INFO, __file__, 0, request_message(fields), (), None,
                extra=fields,
            )  # fmt: skip
            LOGGER.handle(record)
        if tracer is not None:
            tracer(fields, self.traceparent, self.started_ns)


#: Where the current request's log record is kept, on the framework's ``g``.
RECORD_KEY = "_llmbridge_record"
#: Where authentication puts the caller's :class:`~llmbridge.openai.Principal`, on ``g``
#: (its ``id`` is the log line's ``key_id``).
PRINCIPAL_ATTR = "llmbridge_principal"


def current_record(web: Any) -> RequestRecord | None:
    """The current request's log record, made on first use (``None`` outside a request)."""
    if not web.has_request_context():
        return None
    g = web.g
    record: RequestRecord | None = getattr(g, RECORD_KEY, None)
    if record is None:
        request = web.request
        rule = request.url_rule
        record = RequestRecord(
            request.method,
            rule.rule if rule is not None else request.path,
            key_id=getattr(getattr(g, PRINCIPAL_ATTR, None), "id", None),
            traceparent=request.headers.get("traceparent"),
        )
        setattr(g, RECORD_KEY, record)
    return record
