"""Per-key limits: each caller's own requests/min, tokens/min and daily token budget.

A :class:`RateLimit` gives every key the same numbers; :class:`Quotas` gives each key the
numbers of its own :class:`KeyLimits` (an API key file's ``rpm=`` / ``tpm=`` /
``tokens_per_day=``), counted by one :class:`RateLimit` per distinct set of limits, in
memory or in Redis. Keys are counted under their key id, never the key itself.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from .ratelimit import RateLimit

__all__ = ["KeyLimits", "Quotas"]


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What one caller may spend: ``requests_per_minute``, ``tokens_per_minute`` and
    ``tokens_per_day`` (prompt and completion tokens), each ``None`` for no limit.

    Frozen and hashable. Raises ``ValueError`` for a value that isn't a positive int.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")

    @property
    def any(self) -> bool:
        """Whether any limit is set."""
        return any(
            v is not None
            for v in (self.requests_per_minute, self.tokens_per_minute, self.tokens_per_day)
        )

    @classmethod
    def from_options(cls, options: Mapping[str, str], default: KeyLimits | None) -> KeyLimits:
        """``default`` overridden by a key line's ``rpm=``, ``tpm=``, ``tokens_per_day=``
        (an option ``none`` lifts that limit). Raises ``ValueError`` for a bad number."""
        base = default or cls()
        values = {
            "requests_per_minute": base.requests_per_minute,
            "tokens_per_minute": base.tokens_per_minute,
            "tokens_per_day": base.tokens_per_day,
        }
        for option, name in (
            ("rpm", "requests_per_minute"),
            ("tpm", "tokens_per_minute"),
            ("tokens_per_day", "tokens_per_day"),
        ):
            raw = options.get(option)
            if raw is None:
                continue
            if raw.lower() == "none":
                values[name] = None
            elif raw.isdigit():
                values[name] = int(raw)
            else:
                raise ValueError(f"{option} must be a whole number or none")
        return cls(**values)


class Quotas:
    """Enforces each key's :class:`KeyLimits`, in this process (``"memory://"``) or in
    Redis (a ``redis://`` URL), where every worker and host sharing the URL shares each
    key's budget.

    :meth:`acquire` admits a request or raises :class:`~llmbridge.RateLimited` (429,
    with ``retry_after``); :meth:`charge` adds a finished request's tokens. Both are
    coroutines for any event loop and never raise for the store being down (with
    ``fail_open``, as :class:`RateLimit`). Thread-safe.
    """

    def __init__(
        self,
        *,
        storage: str = "memory://",
        prefix: str = "llmbridge-key",
        fail_open: bool = True,
    ) -> None:
        self.storage = storage
        self.prefix = prefix
        self.fail_open = fail_open
        self._limits: dict[KeyLimits, RateLimit] = {}
        self._lock = threading.Lock()
        if not isinstance(storage, str) or not storage.startswith(
            ("memory://", "redis://", "rediss://", "redis+unix://")
        ):
            raise ValueError(f"storage must be 'memory://' or a redis:// URL, got {storage!r}")

    def __repr__(self) -> str:
        return f"Quotas(storage={self.storage!r})"

    def _limit(self, limits: KeyLimits) -> RateLimit | None:
        if not limits.any:
            return None
        with self._lock:
            limit = self._limits.get(limits)
            if limit is None:
                limit = RateLimit(
                    requests_per_minute=limits.requests_per_minute,
                    tokens_per_minute=limits.tokens_per_minute,
                    tokens_per_day=limits.tokens_per_day,
                    storage=self.storage,
                    prefix=self.prefix,
                    fail_open=self.fail_open,
                )
                self._limits[limits] = limit
            return limit

    async def acquire(self, key: str, limits: KeyLimits) -> None:
        """Spend one request of ``key``'s budget; raises :class:`~llmbridge.RateLimited`
        when a limit is reached (a spent token budget included)."""
        limit = self._limit(limits)
        if limit is not None:
            await limit.acquire(key)

    async def charge(self, key: str, limits: KeyLimits, tokens: int) -> None:
        """Add ``tokens`` to ``key``'s token budgets. Never raises for being over."""
        limit = self._limit(limits)
        if limit is not None:
            await limit.charge(key, tokens)

    async def aclose(self) -> None:
        """Close this loop's Redis connections."""
        with self._lock:
            limits = list(self._limits.values())
        await asyncio.gather(*(limit.aclose() for limit in limits))
