"""Per-call policy options and the pipeline's counters and configuration helpers.

:class:`CallOptions` is what a caller passes as ``pipeline.submit(..., policy=...)``;
:class:`PipelineStats` holds the counters the pipeline keeps. Pure data and validation:
nothing here waits or does I/O (a Redis cache is only constructed).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .._exceptions import BadRequest
from .._sansio.counters import Counters
from .cache import Cache, MemoryCache, RedisCache
from .timeouts import Timeouts

__all__ = ["CallOptions", "PipelineStats", "build", "cache_from_config", "hint", "make_cache"]


@dataclass(frozen=True, slots=True)
class CallOptions:
    """Per-call policy options, passed as ``pipeline.submit(prompt, policy=...)``.

    One reserved keyword, ``policy``, carries them so they never collide with the
    backend's own parameters (every other keyword goes to the backend untouched). A plain
    dict with the same names works too.

    - ``key``: the rate-limit key for this call (instead of the key function's);
    - ``namespace``: cache and single-flight namespace (a tenant), added to the
      pipeline's;
    - ``no_cache``: don't answer from the cache (the fresh answer is still stored);
    - ``no_store``: don't store this answer;
    - ``cache_nondeterministic``: cache and share even without temperature 0 or a seed;
    - ``cache_ttl``: seconds this answer stays cached (else the cache's TTL);
    - ``single_flight``: ``False`` opts this call out of sharing;
    - ``retry``: ``False`` turns retries off for this call;
    - ``timeouts``: this call's :class:`Timeouts` instead of the pipeline's.
    """

    key: str | None = None
    namespace: str = ""
    no_cache: bool = False
    no_store: bool = False
    cache_nondeterministic: bool = False
    cache_ttl: float | None = None
    single_flight: bool = True
    retry: bool = True
    timeouts: Timeouts | None = None

    @classmethod
    def coerce(cls, value: CallOptions | Mapping[str, Any] | None) -> CallOptions:
        """``value`` as :class:`CallOptions`. Raises :class:`~llmbridge.BadRequest` naming
        an unknown option or a value of the wrong type."""
        if value is None:
            return _DEFAULT_OPTIONS
        if isinstance(value, CallOptions):
            return value
        if not isinstance(value, Mapping):
            raise BadRequest(f"policy= takes CallOptions or a dict, got {type(value).__name__}")
        names = [f.name for f in fields(cls)]
        for name in value:
            if name not in names:
                raise BadRequest(f"unknown policy option {name!r}{hint(name, names)}")
        options = dict(value)
        timeouts = options.get("timeouts")
        if isinstance(timeouts, Mapping):
            options["timeouts"] = build("timeouts", Timeouts, timeouts, BadRequest)
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"bad policy options: {exc}") from exc

    @classmethod
    def from_cache_control(cls, header: str | None, **options: Any) -> CallOptions:
        """Options from an HTTP ``Cache-Control`` request header (``no-cache``,
        ``no-store``, ``max-age=N`` as the TTL) plus any other ``options``."""
        for directive in (header or "").lower().split(","):
            name, _, arg = directive.strip().partition("=")
            if name in ("no-cache", "no-store"):
                options[name.replace("-", "_")] = True
            elif name == "max-age" and arg.strip().isdigit() and int(arg) > 0:
                options["cache_ttl"] = float(arg)
        return cls.coerce(options)

    def __post_init__(self) -> None:
        if self.key is not None and not isinstance(self.key, str):
            raise TypeError(f"key must be a str, got {type(self.key).__name__}")
        if not isinstance(self.namespace, str):
            raise TypeError(f"namespace must be a str, got {type(self.namespace).__name__}")
        if self.cache_ttl is not None and not (
            isinstance(self.cache_ttl, int | float) and self.cache_ttl > 0
        ):
            raise ValueError(f"cache_ttl must be a positive number, got {self.cache_ttl!r}")
        if self.timeouts is not None and not isinstance(self.timeouts, Timeouts):
            raise TypeError(f"timeouts must be Timeouts, got {type(self.timeouts).__name__}")


_DEFAULT_OPTIONS = CallOptions()


class PipelineStats(Counters):
    """Counters kept on the background loop; read them from anywhere (values may lag)."""

    __slots__ = (
        "backend_calls",
        "cache_hits",
        "cache_misses",
        "circuit_open",
        "coalesced",
        "rate_limited",
        "requests",
        "retries",
        "timeouts",
    )
    backend_calls: int
    cache_hits: int
    cache_misses: int
    circuit_open: int
    coalesced: int
    rate_limited: int
    requests: int
    retries: int
    timeouts: int


def hint(name: str, names: list[str]) -> str:
    """A "did you mean" suffix for an unknown ``name`` among ``names``."""
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; known: {', '.join(sorted(names))}"


def build(what: str, cls: Callable[..., Any], settings: Any, error: type[Exception]) -> Any:
    """``cls(**settings)``, raising ``error`` naming ``what`` on bad settings."""
    if not isinstance(settings, Mapping):
        raise error(f"{what} settings must be a mapping, got {type(settings).__name__}")
    try:
        return cls(**settings)
    except TypeError as exc:
        raise error(f"bad {what} settings: {exc}") from exc
    except ValueError as exc:
        raise error(f"bad {what} settings: {exc}") from exc


def make_cache(cache: Cache | str | None) -> Cache | None:
    """The cache a ``Pipeline(cache=...)`` argument names: ``"memory"``, a Redis URL, a
    :class:`Cache` or ``None``. Raises ``ValueError`` / ``TypeError`` otherwise."""
    if cache is None or isinstance(cache, Cache):
        return cache
    if isinstance(cache, str):
        if cache == "memory":
            return MemoryCache()
        if cache.startswith(("redis://", "rediss://", "unix://")):
            return RedisCache(cache)
        raise ValueError(f"unknown cache {cache!r}: use 'memory', a redis:// URL or a Cache")
    raise TypeError(f"cache must be 'memory', a redis:// URL or a Cache, got {cache!r}")


def cache_from_config(settings: Mapping[str, Any]) -> Cache:
    """The cache a config table describes (``{"backend": "redis", "url": ...}``)."""
    options = dict(settings)
    backend = options.pop("backend", "memory")
    if backend == "memory":
        return build("cache", MemoryCache, options, ValueError)  # type: ignore[no-any-return]
    if backend == "redis":
        if "url" not in options:
            raise ValueError("a redis cache needs a url")
        return build("cache", RedisCache, options, ValueError)  # type: ignore[no-any-return]
    raise ValueError(f"unknown cache backend {backend!r}: use 'memory' or 'redis'")
