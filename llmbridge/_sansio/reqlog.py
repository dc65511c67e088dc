"""The per-request log line's fields, and a JSON formatter for them. No I/O.

One line per request, at its end, on the ``llmbridge.request`` logger at INFO: the
fields travel as ``extra=`` attributes of the :class:`logging.LogRecord` (so any
formatter or handler can read them), and :class:`JsonLogFormatter` writes a record with
all of them as one JSON object.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["REQUEST_FIELDS", "JsonLogFormatter", "request_fields", "request_message"]

#: The fields of a request's log line, in order (``None`` where unknown).
REQUEST_FIELDS = (
    "request_id",
    "method",
    "route",
    "status",
    "queue_s",
    "ttft_s",
    "total_s",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "cancelled",
    "cache_hit",
    "coalesced",
    "rate_limited",
    "key_id",
)

# What every LogRecord has: the JSON formatter writes everything else as a field.
_STANDARD = frozenset(
    [*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime"]
)


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def request_fields(
    *,
    request_id: str | None,
    method: str | None,
    route: str | None,
    status: int | None,
    queued: float | None = None,
    time_to_first_token: float | None = None,
    total: float | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    finish_reason: str | None = None,
    cancelled: bool = False,
    notes: tuple[str, ...] = (),
    rate_limited: bool = False,
    key_id: str | None = None,
) -> dict[str, Any]:
    """The log line's fields (:data:`REQUEST_FIELDS`) from what one request did. Pure.

    Times are seconds from submission (6 decimals); ``notes`` are the policies' words
    (``"cache_hit"``, ``"coalesced"``, ``"rate_limited"``).
    """
    return {
        "request_id": request_id,
        "method": method,
        "route": route,
        "status": status,
        "queue_s": _seconds(queued),
        "ttft_s": _seconds(time_to_first_token),
        "total_s": _seconds(total),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "finish_reason": finish_reason or None,
        "cancelled": cancelled,
        "cache_hit": "cache_hit" in notes,
        "coalesced": "coalesced" in notes,
        "rate_limited": rate_limited or "rate_limited" in notes,
        "key_id": key_id,
    }


def request_message(fields: dict[str, Any]) -> str:
    """The human half of the line: ``POST /chat 200 req-1 0.153s stop``. Pure."""
    total = fields.get("total_s")
    return " ".join(
        str(part)
        for part in (
            fields.get("method") or "-",
            fields.get("route") or "-",
            fields.get("status") or "-",
            fields.get("request_id") or "-",
            "-" if total is None else f"{total:.3f}s",
            fields.get("finish_reason") or "-",
        )
    )


class JsonLogFormatter(logging.Formatter):
    """Formats each record as one JSON object: ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message``, every ``extra=`` field (the request log line's fields among
    them) and ``exc_info`` as text. Attach it to a handler of ``llmbridge.request`` (or
    any logger). Thread-safe, like any :class:`logging.Formatter`."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in data:
                data[key] = value
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)
