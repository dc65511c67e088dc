"""The policy pipeline: an engine wrapped in rate limits, cache, single-flight, a circuit
breaker, retries and timeouts, composed in that order.

:meth:`Pipeline.submit` never blocks: it opens the request (over an
:class:`~llmbridge.Engine`, the engine's own request: one id, one channel), hands it to
the process's background event loop and returns the :class:`~llmbridge.Stream` at once.
On that loop the request goes through the policies::

    rate limit → cache lookup → single-flight join → circuit breaker
        → retry-before-first-token( timeouts( engine job ) )

A refusal (:class:`~llmbridge.RateLimited`, :class:`~llmbridge.CircuitOpen`, a
:class:`~llmbridge.Timeout`) fails the stream, so it surfaces at
:meth:`Stream.wait_started` or the first read, which is where the integrations turn it
into a 429/503/504 before committing a response. The request path itself lives in
:mod:`llmbridge._policies.flow`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
from collections.abc import Mapping
from typing import Any

from .._core.channel import Channel, Request
from .._core.closing import Closing
from .._core.engine import Engine, Submitter
from .._core.stream import Stream
from .._exceptions import BadRequest, LLMBridgeError
from .._runtime.loop import background_loop, spawn
from .._sansio.cachekey import NotCacheable, cache_key, is_deterministic
from .breaker import CircuitBreaker
from .cache import Cache, RedisCache
from .flow import Call, decode_entry, fly, replay, run_direct, wrap
from .options import CallOptions, PipelineStats, build, cache_from_config, hint, make_cache
from .ratelimit import RateLimit
from .retry import Retry
from .singleflight import Flight, FlightGroup
from .timeouts import Timeouts

__all__ = ["CallOptions", "Pipeline", "PipelineStats"]

logger = logging.getLogger("llmbridge")

_ids = itertools.count(1)


def _post(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the loop is gone (interpreter shutdown): nothing left to stop


class Pipeline(Closing):
    """An engine (any :class:`~llmbridge.Submitter`) wrapped in policies; a submitter itself.

    Policies apply in a fixed order: ``rate_limit`` (:class:`RateLimit`) → ``cache``
    (``"memory"``, a ``redis://`` URL, or a :class:`MemoryCache` / :class:`RedisCache`)
    and ``single_flight`` → ``breaker`` (:class:`CircuitBreaker`) → ``retry``
    (:class:`Retry`, or an int number of attempts) → ``timeouts`` (:class:`Timeouts`) →
    the engine. Caching and sharing apply only to deterministic requests (temperature 0,
    greedy, or a fixed seed) unless ``cache_nondeterministic`` (here or per call).

    :meth:`submit` has the engine's signature plus one reserved keyword, ``policy``
    (:class:`CallOptions`), and never blocks. :meth:`start`, :meth:`close` and
    :meth:`aclose` forward to the engine. Thread-safe; usable from any event loop.
    Raises ``ValueError`` / ``TypeError`` on bad configuration.

    >>> from llmbridge import Engine
    >>> pipeline = Pipeline(Engine(str.upper), cache="memory", single_flight=True)
    >>> pipeline.submit("hi", temperature=0).result().text
    'HI'
    >>> pipeline.close()
    """

    def __init__(
        self,
        engine: Submitter,
        /,
        *,
        rate_limit: RateLimit | None = None,
        cache: Cache | str | None = None,
        single_flight: bool = False,
        breaker: CircuitBreaker | None = None,
        retry: Retry | int | None = None,
        timeouts: Timeouts | None = None,
        cache_nondeterministic: bool = False,
        namespace: str = "",
    ) -> None:
        if not isinstance(engine, Submitter):
            raise TypeError(f"Pipeline wraps a submitter (an Engine), got {engine!r}")
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise TypeError(f"rate_limit must be a RateLimit, got {rate_limit!r}")
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {breaker!r}")
        if isinstance(retry, int) and not isinstance(retry, bool):
            retry = Retry(attempts=retry)
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be Retry or an int of attempts, got {retry!r}")
        if timeouts is not None and not isinstance(timeouts, Timeouts):
            raise TypeError(f"timeouts must be Timeouts, got {timeouts!r}")
        if not isinstance(single_flight, bool):
            raise TypeError(f"single_flight must be a bool, got {single_flight!r}")
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {namespace!r}")
        self.engine = engine
        self.rate_limit = rate_limit
        self.cache = make_cache(cache)
        self.single_flight = single_flight
        self.breaker = breaker
        self.retry = retry
        self.timeouts = timeouts or Timeouts()
        self.cache_nondeterministic = bool(cache_nondeterministic)
        self.namespace = namespace
        self.stats = PipelineStats()
        self._passthrough = (
            rate_limit is None
            and self.cache is None
            and not single_flight
            and breaker is None
            and retry is None
            and not self.timeouts.any
        )
        self._flights = FlightGroup()
        self._pid = os.getpid()
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_config(cls, engine: Submitter, config: Mapping[str, Any], /) -> Pipeline:
        """A pipeline from plain settings (a Flask config section, a TOML table).

        ``config`` may hold ``rate_limit``, ``breaker``, ``retry`` and ``timeouts`` as
        dicts of their constructor arguments, ``cache`` as ``"memory"``, a redis URL or a
        dict (``{"backend": "redis", "url": ..., "ttl": ...}``), and ``single_flight``,
        ``cache_nondeterministic``, ``namespace``. An unknown name raises ``ValueError``.
        """
        known = {
            "rate_limit": RateLimit,
            "cache": None,
            "single_flight": None,
            "breaker": CircuitBreaker,
            "retry": Retry,
            "timeouts": Timeouts,
            "cache_nondeterministic": None,
            "namespace": None,
        }
        kwargs: dict[str, Any] = {}
        for name, value in config.items():
            if name not in known:
                raise ValueError(f"unknown policy {name!r}{hint(name, list(known))}")
            factory = known[name]
            if factory is not None and isinstance(value, Mapping):
                value = build(name, factory, value, ValueError)
            elif name == "cache" and isinstance(value, Mapping):
                value = cache_from_config(value)
            kwargs[name] = value
        return cls(engine, **kwargs)

    def __repr__(self) -> str:
        parts = [repr(self.engine)]
        for name in ("rate_limit", "cache", "breaker", "retry"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        if self.single_flight:
            parts.append("single_flight=True")
        if self.timeouts.any:
            parts.append(f"timeouts={self.timeouts!r}")
        return f"Pipeline({', '.join(parts)})"

    # -- the submitter surface ----------------------------------------------------------

    def submit(
        self,
        prompt: str,
        /,
        *,
        policy: CallOptions | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        **params: Any,
    ) -> Stream:
        """Admit a request through the policies and return its :class:`Stream`. Never
        blocks; safe from any thread and event loop.

        ``params`` go to the engine untouched; ``policy`` holds per-call
        :class:`CallOptions`. Policy refusals (:class:`~llmbridge.RateLimited`,
        :class:`~llmbridge.CircuitOpen`, :class:`~llmbridge.Timeout`, the engine's
        :class:`~llmbridge.Overloaded`) fail the stream and surface at
        :meth:`Stream.wait_started` or the first read. Raises
        :class:`~llmbridge.BadRequest` at once for a non-str prompt or bad ``policy``.
        """
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt must be a str, got {type(prompt).__name__}")
        options = CallOptions.coerce(policy)
        if self._passthrough:
            return self.engine.submit(prompt, request_id=request_id, **params)
        engine = self.engine
        if isinstance(engine, Engine):
            # The engine's own request: its id, its channel, written by the backend job.
            channel = engine.open_request(prompt, params, request_id)
        else:
            channel = Channel(Request(request_id or f"pol-{next(_ids)}", prompt, params))
        request = channel.request
        limit_key = None
        if self.rate_limit is not None:
            # In the caller's context, so a key function may read the framework's request.
            limit_key = options.key if options.key is not None else self.rate_limit.key(request)
        call = Call(channel, options, limit_key, self._shared_key(request, options))
        loop = background_loop()
        channel.set_on_cancel(functools.partial(self._on_cancel, loop, call))
        loop.call_soon_threadsafe(self._begin, call)
        return Stream(channel)

    def _on_cancel(self, loop: asyncio.AbstractEventLoop, call: Call) -> None:
        # The consumer's thread: stop the backend job at once, then the policies.
        job = call.job
        if job is not None:
            job.cancel()
        _post(loop, self._abandon, call)

    def _shared_key(self, request: Request, options: CallOptions) -> str | None:
        if self.cache is None and not (self.single_flight and options.single_flight):
            return None
        if not (
            options.cache_nondeterministic
            or self.cache_nondeterministic
            or is_deterministic(request.params)
        ):
            return None
        namespace = self.namespace
        if options.namespace:
            namespace = f"{namespace}\0{options.namespace}"
        try:
            return cache_key(request.prompt, request.params, namespace=namespace)
        except NotCacheable:
            return None  # a parameter with no canonical form: never share or cache it

    def start(self) -> Pipeline:
        """Start the engine now (forwarded to ``engine.start()`` if it has one)."""
        start = getattr(self.engine, "start", None)
        if callable(start):
            start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Close the engine (blocks like :meth:`Engine.close`) and this process's Redis
        connections. Idempotent."""
        close = getattr(self.engine, "close", None)
        if callable(close):
            close(timeout)
        if self._has_clients():
            spawn(self._aclose_clients()).result(10)

    async def aclose(self, timeout: float | None = None) -> None:
        """The async twin of :meth:`close`."""
        aclose = getattr(self.engine, "aclose", None)
        if callable(aclose):
            await aclose(timeout)
        if self._has_clients():
            await asyncio.wrap_future(spawn(self._aclose_clients()))

    def _has_clients(self) -> bool:
        return isinstance(self.cache, RedisCache) or (
            self.rate_limit is not None and self.rate_limit.shared
        )

    async def _aclose_clients(self) -> None:
        if isinstance(self.cache, RedisCache):
            await self.cache.aclose()
            self.cache.close()
        if self.rate_limit is not None:
            await self.rate_limit.aclose()

    # -- on the background loop ---------------------------------------------------------

    def _begin(self, call: Call) -> None:
        if self._pid != os.getpid():
            # Forked: the parent's flights never run here.
            self._pid = os.getpid()
            self._flights.clear()
            self._tasks.clear()
        self.stats.requests += 1
        task = asyncio.get_running_loop().create_task(self._admit(call))
        call.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _abandon(self, call: Call) -> None:
        if call.direct:
            if call.task is not None:
                call.task.cancel()
            return
        flight = call.flight
        if flight is not None and flight.leave(call.channel):
            self._flights.discard(flight)
            if flight.task is not None:
                flight.task.cancel()

    async def _admit(self, call: Call) -> None:
        channel = call.channel
        options = call.options
        try:
            if self.rate_limit is not None and call.limit_key is not None:
                try:
                    await self.rate_limit.acquire(call.limit_key)
                except LLMBridgeError:
                    self.stats.rate_limited += 1
                    channel.note("rate_limited")
                    raise
            key = call.shared_key
            if key is not None and self.cache is not None and not options.no_cache:
                value = await self.cache.aget(key)
                entry = decode_entry(value)
                if entry is not None:
                    self.stats.cache_hits += 1
                    channel.note("cache_hit")
                    replay(entry, channel)
                    return
                self.stats.cache_misses += 1
            if channel.ended:
                return  # abandoned while waiting for the limiter or the cache
            if key is None and isinstance(self.engine, Engine):
                # Nothing needs a copy of the text: the backend writes to the caller.
                call.direct = True
                await run_direct(self, call)
                return
            sharing = key is not None and self.single_flight and options.single_flight
            if sharing:
                assert key is not None
                flight = self._flights.get(key)
                if flight is not None:
                    self.stats.coalesced += 1
                    channel.note("coalesced")
                    call.flight = flight
                    flight.join(channel)
                    return
            flight = Flight(key if sharing else None)
            if sharing:
                self._flights.add(flight)
            call.flight = flight
            flight.join(channel)
            flight.task = asyncio.get_running_loop().create_task(fly(self, flight, call))
        except LLMBridgeError as exc:
            channel.fail(exc)
        except Exception as exc:
            channel.fail(wrap(exc, call.request.id))

    def _count_retry(self, error: BaseException, delay: float) -> None:
        self.stats.retries += 1
        logger.info("retrying after %s in %.2f s", type(error).__name__, delay)
