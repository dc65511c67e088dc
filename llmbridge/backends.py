"""Backends an :class:`~llmbridge.Engine` can drive.

- :class:`StepBackend` drives an ExLlamaV2-style step generator (``enqueue``,
  ``iterate``, ``cancel``) with many jobs in flight.
- :class:`CallableBackend` runs ``fn(prompt, **params)``: sync or async, returning text
  or yielding chunks. ``Engine(fn)`` wraps a callable in it for you.
- :class:`AsyncBackend` is the protocol for a coroutine-per-request backend run on the
  engine's own event loop; :func:`serve_async` runs one.
- :class:`Backend` is the protocol the engine itself drives.
"""

from __future__ import annotations

from ._backends import AsyncBackend, CallableBackend, StepBackend, StepGenerator, serve_async
from ._engine import Backend, Job, JobQueue

__all__ = [
    "AsyncBackend",
    "Backend",
    "CallableBackend",
    "Job",
    "JobQueue",
    "StepBackend",
    "StepGenerator",
    "serve_async",
]
