"""Throughput and protection policies between the views and the engine.

- :class:`Pipeline` wraps an engine in policies, composed in a fixed order: rate limit →
  cache / single-flight → circuit breaker → retry-before-first-token → timeouts →
  engine. It is a :class:`~llmbridge.Submitter`, so the Flask and Quart integrations
  take it wherever they take an engine. Per-call options go in ``policy=``
  (:class:`CallOptions`).
- :class:`RateLimit` (requests and tokens per minute per key, in memory or Redis, on the
  ``limits`` library), :class:`MemoryCache` / :class:`RedisCache` (JSON values, TTL),
  :class:`CircuitBreaker`, :class:`Retry` (tenacity), :class:`Timeouts`.
- :class:`BatchBackend` is a dynamic batcher for ``fn(list[Request]) -> list[str]``.
- :func:`cache_key` and :func:`is_deterministic` are the pure rules behind the cache.

Importing this module does not import redis; a Redis-backed policy imports it when built
and raises ``ImportError`` naming the extra (``pip install "llmbridge[redis]"``).
"""

from __future__ import annotations

from ._backends.batching import BatchBackend
from ._policies.breaker import CircuitBreaker
from ._policies.cache import Cache, MemoryCache, RedisCache
from ._policies.pipeline import CallOptions, Pipeline, PipelineStats
from ._policies.ratelimit import RateLimit
from ._policies.retry import Retry
from ._policies.timeouts import Timeouts
from ._sansio.cachekey import cache_key, is_deterministic

__all__ = [
    "BatchBackend",
    "Cache",
    "CallOptions",
    "CircuitBreaker",
    "MemoryCache",
    "Pipeline",
    "PipelineStats",
    "RateLimit",
    "RedisCache",
    "Retry",
    "Timeouts",
    "cache_key",
    "is_deterministic",
]
