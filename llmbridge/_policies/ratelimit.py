"""Rate limits per key: requests and tokens per minute and tokens per day, on `limits`.

Counting is done by ``limits`` (moving window by default), in process memory or in Redis,
where every worker and host that shares the Redis URL shares the budget: a 60/minute
limit admits 60 in total, however many workers there are.

Tokens are only known once a request ends, so a request is admitted while its key has
token budget left and charged with the tokens the backend reported when it ends (a
request that overshoots exhausts the window, which then refuses until it slides on).
Only backend work is charged: cache hits and single-flight followers are free. The daily
token budget is a fixed window of one day from a key's first charge (a counter, whatever
the strategy: a moving window would keep one entry per token).

A shared store that cannot be reached does not take the service down: by default
(``fail_open=True``) requests are admitted, one warning is logged per outage and the
store is tried again after ``retry_interval``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

from .._core.stream import Request
from .._exceptions import Overloaded, RateLimited

__all__ = ["RateLimit"]

logger = logging.getLogger("llmbridge")

_STRATEGIES = ("moving-window", "fixed-window", "sliding-window-counter")


def _import_limits() -> Any:
    try:
        import limits
        import limits.aio.storage
        import limits.aio.strategies
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'rate limits need the limits library: pip install "llmbridge[limits]"'
        ) from exc
    return limits


def _per_minute(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def _global_key(request: Request) -> str:
    return "global"


class _Store:
    """The ``limits`` storage and limiter of one process and event loop."""

    def __init__(self, limits: Any, storage: Any, limiter: Any, daily: Any, pool: Any) -> None:
        self.limits = limits
        self.storage = storage
        self.limiter = limiter
        self.daily = daily  # always a fixed window: a counter, not an entry per token
        self.pool = pool


class RateLimit:
    """Requests per minute, tokens per minute and tokens per day for each key.

    ``key(request)`` names whose budget a request spends (an API key, a user, a client
    address); it runs in :meth:`Pipeline.submit`'s caller, so it may read the web
    framework's request context. A call's ``policy=CallOptions(key=...)`` overrides it.
    ``storage`` is ``"memory://"`` (this process) or a ``redis://`` URL (shared).
    ``strategy`` is a ``limits`` strategy: ``"moving-window"``, ``"fixed-window"`` or
    ``"sliding-window-counter"``.

    Exceeding a limit raises :class:`~llmbridge.RateLimited` (429) whose ``retry_after``
    is when the window frees up. Raises ``ValueError`` on bad configuration and
    ``ImportError`` without the ``limits`` library. Thread-safe; its async methods run on
    any event loop (a store per loop).
    """

    def __init__(
        self,
        *,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        tokens_per_day: int | None = None,
        key: Callable[[Request], str] | None = None,
        storage: str = "memory://",
        strategy: str = "moving-window",
        fail_open: bool = True,
        retry_interval: float = 2.0,
        timeout: float = 0.5,
        prefix: str = "llmbridge",
    ) -> None:
        self._limits = _import_limits()
        self.requests_per_minute = _per_minute("requests_per_minute", requests_per_minute)
        self.tokens_per_minute = _per_minute("tokens_per_minute", tokens_per_minute)
        self.tokens_per_day = _per_minute("tokens_per_day", tokens_per_day)
        if requests_per_minute is None and tokens_per_minute is None and tokens_per_day is None:
            raise ValueError(
                "RateLimit needs requests_per_minute, tokens_per_minute or tokens_per_day"
            )
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable key(request) -> str, got {key!r}")
        self.key: Callable[[Request], str] = key or _global_key
        if not isinstance(storage, str) or not storage.startswith(
            ("memory://", "redis://", "rediss://", "redis+unix://")
        ):
            raise ValueError(f"storage must be 'memory://' or a redis:// URL, got {storage!r}")
        self.storage = storage
        if strategy not in _STRATEGIES:
            raise ValueError(
                f"unknown strategy {strategy!r}: choose one of {', '.join(_STRATEGIES)}"
            )
        self.strategy = strategy
        self.fail_open = bool(fail_open)
        if retry_interval < 0 or not timeout > 0:
            raise ValueError("retry_interval must be >= 0 and timeout > 0")
        self.retry_interval = retry_interval
        self.timeout = timeout
        limits = self._limits
        self._rpm = (
            None
            if requests_per_minute is None
            else limits.RateLimitItemPerMinute(requests_per_minute, namespace=f"{prefix}-rpm")
        )
        self._tpm = (
            None
            if tokens_per_minute is None
            else limits.RateLimitItemPerMinute(tokens_per_minute, namespace=f"{prefix}-tpm")
        )
        self._tpd = (
            None
            if tokens_per_day is None
            else limits.RateLimitItemPerDay(tokens_per_day, namespace=f"{prefix}-tpd")
        )
        self._stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Store]
        self._stores = weakref.WeakKeyDictionary()
        self._pid = os.getpid()
        self._down_until = 0.0
        self._down = False

    def __repr__(self) -> str:
        return (
            f"RateLimit(requests_per_minute={self.requests_per_minute}, "
            f"tokens_per_minute={self.tokens_per_minute}, "
            f"tokens_per_day={self.tokens_per_day}, storage={self.storage!r})"
        )

    @property
    def shared(self) -> bool:
        """True if the budget is kept in Redis, shared across processes."""
        return not self.storage.startswith("memory://")

    def _store(self) -> _Store:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._stores = weakref.WeakKeyDictionary()
        loop = asyncio.get_running_loop()
        store = self._stores.get(loop)
        if store is not None:
            return store
        limits = self._limits
        pool = None
        if self.shared:
            import redis.asyncio

            pool = redis.asyncio.ConnectionPool.from_url(
                self.storage, socket_connect_timeout=self.timeout, socket_timeout=self.timeout
            )
            storage = limits.aio.storage.RedisStorage(
                "async+" + self.storage,
                implementation="redispy",
                wrap_exceptions=True,
                connection_pool=pool,
            )
        else:
            storage = limits.aio.storage.MemoryStorage()
        strategies = limits.aio.strategies
        cls = {
            "moving-window": strategies.MovingWindowRateLimiter,
            "fixed-window": strategies.FixedWindowRateLimiter,
            "sliding-window-counter": strategies.SlidingWindowCounterRateLimiter,
        }[self.strategy]
        daily = strategies.FixedWindowRateLimiter(storage)
        store = _Store(limits, storage, cls(storage), daily, pool)
        self._stores[loop] = store
        return store

    async def _retry_after(self, store: _Store, item: Any, key: str) -> float:
        limiter = store.daily if item is self._tpd else store.limiter
        stats = await limiter.get_window_stats(item, key)
        return float(max(1, math.ceil(stats.reset_time - time.time())))

    async def acquire(self, key: str) -> None:
        """Spend one request of ``key``'s budget, or raise :class:`~llmbridge.RateLimited`.

        Also refuses a key whose token budget is spent. Raises
        :class:`~llmbridge.Overloaded` only if the store is unreachable and
        ``fail_open`` is false.
        """
        if not self._usable():
            return
        try:
            store = self._store()
            limiter = store.limiter
            if self._tpd is not None and not await store.daily.test(self._tpd, key):
                after = await self._retry_after(store, self._tpd, key)
                raise RateLimited(
                    f"{key!r} used its daily budget of {self.tokens_per_day} tokens",
                    retry_after=after,
                )
            if self._tpm is not None and not await limiter.test(self._tpm, key):
                after = await self._retry_after(store, self._tpm, key)
                raise RateLimited(
                    f"{key!r} used its {self.tokens_per_minute} tokens per minute",
                    retry_after=after,
                )
            if self._rpm is not None and not await limiter.hit(self._rpm, key):
                after = await self._retry_after(store, self._rpm, key)
                raise RateLimited(
                    f"{key!r} made its {self.requests_per_minute} requests per minute",
                    retry_after=after,
                )
        except RateLimited:
            self._worked()
            raise
        except Exception as exc:
            self._failed(exc)
            return
        self._worked()

    async def charge(self, key: str, tokens: int) -> None:
        """Charge ``tokens`` to ``key``'s per-minute and daily token budgets (never
        raises for being over: the window just fills up)."""
        if tokens <= 0 or time.monotonic() < self._down_until:
            return
        try:
            store = self._store()
            for limiter, item in ((store.limiter, self._tpm), (store.daily, self._tpd)):
                if item is None:
                    continue
                if not await limiter.hit(item, key, cost=tokens):
                    # More than is left: spend what is left so the window reads as full.
                    stats = await limiter.get_window_stats(item, key)
                    if stats.remaining > 0:
                        await limiter.hit(item, key, cost=stats.remaining)
        except Exception as exc:
            self._failed(exc, refuse=False)
            return
        self._worked()

    async def aclose(self) -> None:
        """Close this loop's Redis connections (if any). The limit stays usable."""
        try:
            store = self._stores.pop(asyncio.get_running_loop(), None)
        except RuntimeError:
            return
        if store is not None and store.pool is not None:
            await store.pool.disconnect()

    def _usable(self) -> bool:
        if time.monotonic() >= self._down_until:
            return True
        if not self.fail_open:
            raise Overloaded("the rate limit store is unreachable", retry_after=1.0)
        return False

    def _failed(self, exc: BaseException, *, refuse: bool = True) -> None:
        self._down_until = time.monotonic() + self.retry_interval
        if not self._down:
            self._down = True
            logger.warning(
                "rate limit store %s unreachable (%s: %s): %s",
                self.storage,
                type(exc).__name__,
                exc,
                "admitting requests unlimited for now" if self.fail_open else "refusing requests",
            )
        if refuse and not self.fail_open:
            raise Overloaded("the rate limit store is unreachable", retry_after=1.0) from exc

    def _worked(self) -> None:
        if self._down:
            self._down = False
            logger.info("rate limit store %s reachable again", self.storage)
