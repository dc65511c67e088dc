"""Response caches: in-memory LRU with TTL, and Redis shared across workers and hosts.

Values are JSON, never pickle: a value that does not encode raises ``TypeError`` when it
is stored, naming where in the value the problem is. The memory cache stores the JSON
text too, so both caches behave alike and a caller can never mutate a cached entry.

A Redis cache that cannot be reached is not an error: reads miss and writes are skipped,
with one logged warning per outage, and Redis is tried again after ``retry_interval``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = ["Cache", "MemoryCache", "RedisCache", "encode_value"]

logger = logging.getLogger("llmbridge")


def _find_bad(value: Any, path: str) -> str | None:
    if value is None or isinstance(value, bool | int | str):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value!r}"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has the non-str key {key!r}"
            bad = _find_bad(item, f"{path}.{key}")
            if bad is not None:
                return bad
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            bad = _find_bad(item, f"{path}[{i}]")
            if bad is not None:
                return bad
        return None
    return f"{path} is a {type(value).__name__}"


def encode_value(value: Any) -> str:
    """Encode a cache value as compact JSON.

    Raises ``TypeError`` naming the offending part if ``value`` is not plain JSON
    (dicts with str keys, lists, str, int, finite float, bool, None).
    """
    bad = _find_bad(value, "value")
    if bad is not None:
        raise TypeError(f"cache values must be JSON-serialisable (never pickled): {bad}")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _check_ttl(ttl: float | None, what: str = "ttl") -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise ValueError(f"{what} must be a positive number of seconds or None, got {ttl!r}")
    return float(ttl)


@runtime_checkable
class Cache(Protocol):
    """What a pipeline needs from a cache: async get and set of JSON values.

    ``aget`` returns ``None`` on a miss; ``aset`` stores for ``ttl`` seconds (``None``:
    the cache's default). Neither may raise because the store is unreachable.
    """

    async def aget(self, key: str) -> Any | None: ...

    async def aset(self, key: str, value: Any, ttl: float | None = None) -> None: ...


class MemoryCache:
    """An in-process LRU cache with a time to live per entry. Thread-safe; never blocks
    beyond a short lock.

    Holds at most ``max_entries`` entries (the least recently used go first); an entry
    expires ``ttl`` seconds after it was stored (``None``: never). Raises ``ValueError``
    on a non-positive size or TTL.

    >>> cache = MemoryCache(max_entries=2, ttl=60)
    >>> cache.set("k", {"text": "hi"})
    >>> cache.get("k")
    {'text': 'hi'}
    """

    def __init__(
        self,
        *,
        max_entries: int = 1024,
        ttl: float | None = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        self.ttl = _check_ttl(ttl)
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __repr__(self) -> str:
        return f"MemoryCache(max_entries={self.max_entries}, ttl={self.ttl})"

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        """The value stored under ``key`` (a fresh copy), or ``None``."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, text = entry
            if expires <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
        return json.loads(text)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``. Raises ``TypeError`` if it is not plain JSON."""
        text = encode_value(value)
        ttl = _check_ttl(ttl) if ttl is not None else self.ttl
        expires = math.inf if ttl is None else self._clock() + ttl
        with self._lock:
            self._entries[key] = (expires, text)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def delete(self, key: str) -> None:
        """Forget ``key`` (a no-op if absent)."""
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()

    async def aget(self, key: str) -> Any | None:
        """The async twin of :meth:`get` (no I/O: it never suspends)."""
        return self.get(key)

    async def aset(self, key: str, value: Any, ttl: float | None = None) -> None:
        """The async twin of :meth:`set` (no I/O: it never suspends)."""
        self.set(key, value, ttl)


def _import_redis() -> Any:
    try:
        import redis
        import redis.asyncio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('the Redis cache needs redis-py: pip install "llmbridge[redis]"') from exc
    return redis


class RedisCache:
    """A cache in Redis, shared by every worker and host that uses the same ``url``.

    Sync (:meth:`get`, :meth:`set`) and async (:meth:`aget`, :meth:`aset`) methods use
    redis-py's clients; an async client is made per event loop, on first use there.
    Keys are ``prefix + key``; entries expire after ``ttl`` seconds (Redis ``PX``).

    Redis being unreachable is never an error: reads return ``None``, writes are
    skipped, one warning is logged per outage, and Redis is not tried again for
    ``retry_interval`` seconds (so a dead Redis costs one connect timeout, not one per
    request). Thread-safe. Raises ``ImportError`` without redis-py and ``ValueError``
    on a bad TTL or timeout.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: float | None = 3600.0,
        prefix: str = "llmbridge:cache:",
        timeout: float = 0.5,
        retry_interval: float = 2.0,
    ) -> None:
        self._redis = _import_redis()
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"url must be a redis:// URL, got {url!r}")
        self.url = url
        self.ttl = _check_ttl(ttl)
        self.prefix = prefix
        self.timeout = _check_ttl(timeout, "timeout") or 0.5
        if retry_interval < 0:
            raise ValueError(f"retry_interval must be >= 0, got {retry_interval!r}")
        self.retry_interval = retry_interval
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down = False
        self._pid = os.getpid()
        self._sync: redis.Redis | None = None
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis]
        self._async = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"RedisCache({self.url!r}, ttl={self.ttl}, prefix={self.prefix!r})"

    # -- clients ------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        return {
            "socket_connect_timeout": self.timeout,
            "socket_timeout": self.timeout,
            "decode_responses": True,
        }

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            # The parent's sockets must not be shared with it: start over here.
            self._pid = os.getpid()
            self._sync = None
            self._async = weakref.WeakKeyDictionary()
            self._lock = threading.Lock()

    def _sync_client(self) -> redis.Redis:
        self._check_fork()
        with self._lock:
            if self._sync is None:
                self._sync = self._redis.Redis.from_url(self.url, **self._options())
            return self._sync

    def _async_client(self) -> redis.asyncio.Redis:
        self._check_fork()
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            client = self._redis.asyncio.Redis.from_url(self.url, **self._options())
            self._async[loop] = client
        return client

    # -- outage bookkeeping --------------------------------------------------------------

    def _usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_interval
        if not self._down:
            self._down = True
            logger.warning(
                "redis cache at %s unreachable (%s: %s): serving uncached for now",
                self.url,
                what,
                exc,
            )

    def _worked(self) -> None:
        if self._down:
            self._down = False
            logger.info("redis cache at %s reachable again", self.url)

    def _decode(self, raw: Any) -> Any | None:
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            logger.warning("redis cache at %s holds a non-JSON entry: ignored", self.url)
            return None

    def _px(self, ttl: float | None) -> int | None:
        ttl = _check_ttl(ttl) if ttl is not None else self.ttl
        return None if ttl is None else max(1, int(ttl * 1000))

    # -- sync ------------------------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """The value under ``key`` or ``None`` (also when Redis is unreachable). Blocks
        for at most about ``timeout`` seconds."""
        if not self._usable():
            return None
        try:
            raw = self._sync_client().get(self.prefix + key)
        except self._redis.RedisError as exc:
            self._failed("get", exc)
            return None
        self._worked()
        return self._decode(raw)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``; skipped if Redis is unreachable. Raises
        ``TypeError`` if ``value`` is not plain JSON."""
        text = encode_value(value)
        px = self._px(ttl)
        if not self._usable():
            return
        try:
            self._sync_client().set(self.prefix + key, text, px=px)
        except self._redis.RedisError as exc:
            self._failed("set", exc)
            return
        self._worked()

    def delete(self, key: str) -> None:
        """Forget ``key``; skipped if Redis is unreachable."""
        try:
            self._sync_client().delete(self.prefix + key)
        except self._redis.RedisError as exc:
            self._failed("delete", exc)

    def close(self) -> None:
        """Close the sync client's connections. The cache stays usable."""
        with self._lock:
            client, self._sync = self._sync, None
        if client is not None:
            client.close()

    # -- async -----------------------------------------------------------------------------

    async def aget(self, key: str) -> Any | None:
        """The async twin of :meth:`get`."""
        if not self._usable():
            return None
        try:
            raw = await self._async_client().get(self.prefix + key)
        except (self._redis.RedisError, OSError) as exc:
            self._failed("get", exc)
            return None
        self._worked()
        return self._decode(raw)

    async def aset(self, key: str, value: Any, ttl: float | None = None) -> None:
        """The async twin of :meth:`set`."""
        text = encode_value(value)
        px = self._px(ttl)
        if not self._usable():
            return
        try:
            await self._async_client().set(self.prefix + key, text, px=px)
        except (self._redis.RedisError, OSError) as exc:
            self._failed("set", exc)
            return
        self._worked()

    async def aclose(self) -> None:
        """Close the async client of the running loop. The cache stays usable."""
        client = self._async.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
