"""llmbridge: correct, concurrent LLM calls from Flask and Quart apps.

One :class:`Engine` per process owns the backend on a thread of its own; callers
:meth:`~Engine.submit` a request and read its :class:`Stream` from a thread or a
coroutine. Framework glue lives in ``llmbridge.flask``, ``llmbridge.quart`` and
``llmbridge.asgi``, imported only on purpose.
"""

from __future__ import annotations

from ._core.engine import Engine, EngineStats, Submitter
from ._core.locked import Locked, locked
from ._core.observe import Observer
from ._core.request import RequestOutcome
from ._core.stream import Completion, Request, Stream
from ._exceptions import (
    BackendError,
    BadRequest,
    Cancelled,
    CircuitOpen,
    ConcurrentEntryError,
    EngineClosed,
    LLMBridgeError,
    OffloadError,
    Overloaded,
    RateLimited,
    RemoteError,
    SlowConsumer,
    Timeout,
    UpstreamError,
    UpstreamRejected,
)
from ._sansio.reqlog import JsonLogFormatter

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BadRequest",
    "Cancelled",
    "CircuitOpen",
    "Completion",
    "ConcurrentEntryError",
    "Engine",
    "EngineClosed",
    "EngineStats",
    "JsonLogFormatter",
    "LLMBridgeError",
    "Locked",
    "Observer",
    "OffloadError",
    "Overloaded",
    "RateLimited",
    "RemoteError",
    "Request",
    "RequestOutcome",
    "SlowConsumer",
    "Stream",
    "Submitter",
    "Timeout",
    "UpstreamError",
    "UpstreamRejected",
    "__version__",
    "locked",
]
