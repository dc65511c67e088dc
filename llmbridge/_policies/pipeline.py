"""The policy pipeline: an engine wrapped in rate limits, cache, single-flight, a circuit
breaker, retries and timeouts, composed in that order.

:meth:`Pipeline.submit` never blocks: it builds the request's channel, hands the request
to the process's background event loop and returns the :class:`~llmbridge.Stream` at
once. On that loop the request goes through the policies::

    rate limit → cache lookup → single-flight join → circuit breaker
        → retry-before-first-token( timeouts( engine.submit ) )

A refusal (:class:`~llmbridge.RateLimited`, :class:`~llmbridge.CircuitOpen`, a
:class:`~llmbridge.Timeout`) fails the stream, so it surfaces at
:meth:`Stream.wait_started` or the first read, which is where the integrations turn it
into a 429/503/504 before committing a response.

Every request runs as a :class:`~llmbridge._singleflight.Flight` on the loop; with
single-flight on, identical deterministic requests share one.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .._core.closing import Closing
from .._core.engine import Submitter
from .._core.stream import Channel, Completion, Request, Stream
from .._exceptions import (
    BackendError,
    BadRequest,
    Cancelled,
    LLMBridgeError,
    Overloaded,
    Timeout,
)
from .._runtime.loop import background_loop, spawn
from .._sansio.cachekey import NotCacheable, cache_key, is_deterministic
from .breaker import CircuitBreaker, Ticket
from .cache import Cache, MemoryCache, RedisCache
from .ratelimit import RateLimit
from .retry import Retry, retrying
from .singleflight import Flight, FlightGroup
from .timeouts import Deadlines, Timeouts

__all__ = ["CallOptions", "Pipeline", "PipelineStats"]

logger = logging.getLogger("llmbridge")

_ids = itertools.count(1)


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
                raise BadRequest(f"unknown policy option {name!r}{_hint(name, names)}")
        options = dict(value)
        timeouts = options.get("timeouts")
        if isinstance(timeouts, Mapping):
            options["timeouts"] = _build("timeouts", Timeouts, timeouts, BadRequest)
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


class PipelineStats:
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

    def __init__(self) -> None:
        self.requests = 0
        self.backend_calls = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.coalesced = 0
        self.rate_limited = 0
        self.circuit_open = 0
        self.retries = 0
        self.timeouts = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {name: getattr(self, name) for name in self.__slots__}


def _hint(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; known: {', '.join(sorted(names))}"


def _build(what: str, cls: Callable[..., Any], settings: Any, error: type[Exception]) -> Any:
    if not isinstance(settings, Mapping):
        raise error(f"{what} settings must be a mapping, got {type(settings).__name__}")
    try:
        return cls(**settings)
    except TypeError as exc:
        raise error(f"bad {what} settings: {exc}") from exc
    except ValueError as exc:
        raise error(f"bad {what} settings: {exc}") from exc


def _make_cache(cache: Cache | str | None) -> Cache | None:
    if cache is None or isinstance(cache, Cache):
        return cache
    if isinstance(cache, str):
        if cache == "memory":
            return MemoryCache()
        if cache.startswith(("redis://", "rediss://", "unix://")):
            return RedisCache(cache)
        raise ValueError(f"unknown cache {cache!r}: use 'memory', a redis:// URL or a Cache")
    raise TypeError(f"cache must be 'memory', a redis:// URL or a Cache, got {cache!r}")


class _Call:
    """One request as the pipeline tracks it on the loop."""

    __slots__ = ("channel", "flight", "limit_key", "options", "shared_key")

    def __init__(
        self,
        channel: Channel,
        options: CallOptions,
        limit_key: str | None,
        shared_key: str | None,
    ) -> None:
        self.channel = channel
        self.options = options
        self.limit_key = limit_key
        self.shared_key = shared_key
        self.flight: Flight | None = None

    @property
    def request(self) -> Request:
        return self.channel.request


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the loop is gone (interpreter shutdown): nothing left to stop


def _counts_against_backend(error: BaseException) -> bool:
    """Whether an error says the backend is unhealthy (for the circuit breaker)."""
    if isinstance(error, Cancelled | BadRequest | Overloaded):
        return False
    if isinstance(error, LLMBridgeError):
        return isinstance(error, BackendError | Timeout)
    return True


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
        self.cache = _make_cache(cache)
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
                raise ValueError(f"unknown policy {name!r}{_hint(name, list(known))}")
            factory = known[name]
            if factory is not None and isinstance(value, Mapping):
                value = _build(name, factory, value, ValueError)
            elif name == "cache" and isinstance(value, Mapping):
                value = _cache_from_config(value)
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
        request = Request(request_id or f"pol-{next(_ids)}", prompt, params)
        channel = Channel(request)
        limit_key = None
        if self.rate_limit is not None:
            # In the caller's context, so a key function may read the framework's request.
            limit_key = options.key if options.key is not None else self.rate_limit.key(request)
        call = _Call(channel, options, limit_key, self._shared_key(request, options))
        loop = background_loop()
        channel.set_on_cancel(functools.partial(_post, loop, self._abandon, call))
        loop.call_soon_threadsafe(self._begin, call)
        return Stream(channel)

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

    def _begin(self, call: _Call) -> None:
        if self._pid != os.getpid():
            # Forked: the parent's flights never run here.
            self._pid = os.getpid()
            self._flights.clear()
            self._tasks.clear()
        self.stats.requests += 1
        task = asyncio.get_running_loop().create_task(self._admit(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _abandon(self, call: _Call) -> None:
        flight = call.flight
        if flight is not None and flight.leave(call.channel):
            self._flights.discard(flight)
            if flight.task is not None:
                flight.task.cancel()

    async def _admit(self, call: _Call) -> None:
        channel = call.channel
        options = call.options
        try:
            if self.rate_limit is not None and call.limit_key is not None:
                try:
                    await self.rate_limit.acquire(call.limit_key)
                except LLMBridgeError:
                    self.stats.rate_limited += 1
                    raise
            key = call.shared_key
            if key is not None and self.cache is not None and not options.no_cache:
                value = await self.cache.aget(key)
                entry = _decode_entry(value)
                if entry is not None:
                    self.stats.cache_hits += 1
                    _replay(entry, channel)
                    return
                self.stats.cache_misses += 1
            if channel.ended:
                return  # abandoned while waiting for the limiter or the cache
            sharing = key is not None and self.single_flight and options.single_flight
            if sharing:
                assert key is not None
                flight = self._flights.get(key)
                if flight is not None:
                    self.stats.coalesced += 1
                    call.flight = flight
                    flight.join(channel)
                    return
            flight = Flight(key if sharing else None)
            if sharing:
                self._flights.add(flight)
            call.flight = flight
            flight.join(channel)
            flight.task = asyncio.get_running_loop().create_task(self._fly(flight, call))
        except LLMBridgeError as exc:
            channel.fail(exc)
        except Exception as exc:
            logger.exception("llmbridge pipeline failed to admit %s", call.request.id)
            error = BackendError(f"the policy pipeline failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            channel.fail(error)

    async def _fly(self, flight: Flight, call: _Call) -> None:
        request = call.request
        options = call.options
        deadlines = Deadlines(options.timeouts or self.timeouts, request.submitted_at)
        ticket: Ticket | None = None
        first_text_at: list[float] = []
        try:
            if self.breaker is not None:
                try:
                    ticket = self.breaker.admit()
                except LLMBridgeError:
                    self.stats.circuit_open += 1
                    raise
            started = time.monotonic()

            async def attempt() -> Completion:
                self.stats.backend_calls += 1
                deadlines.attempt_started(time.monotonic())
                inner = self.engine.submit(request.prompt, request_id=request.id, **request.params)
                try:
                    return await self._pump(inner, flight, deadlines, first_text_at)
                finally:
                    inner.close()  # a timeout or a cancelled flight stops the backend job

            if self.retry is not None and options.retry:

                def may_retry(error: BaseException) -> bool:
                    return not flight.has_text and bool(getattr(error, "retryable", False))

                completion = await retrying(
                    attempt,
                    self.retry,
                    may_retry=may_retry,
                    deadline=deadlines.end,
                    on_retry=self._count_retry,
                )
            else:
                completion = await attempt()
        except asyncio.CancelledError:
            # Nobody is left reading: the backend job was cancelled with the attempt.
            if ticket is not None and self.breaker is not None:
                self.breaker.release(ticket)
            flight.fail(Cancelled("every reader left"))
            raise
        except Exception as exc:
            error = exc if isinstance(exc, LLMBridgeError) else _wrap(exc)
            if isinstance(error, Timeout):
                self.stats.timeouts += 1
            if ticket is not None and self.breaker is not None:
                if _counts_against_backend(error):
                    self.breaker.record(ticket, failed=True)
                else:
                    self.breaker.release(ticket)
            self._flights.discard(flight)
            flight.fail(error)
            return
        if ticket is not None and self.breaker is not None:
            ttft = first_text_at[0] - started if first_text_at else None
            self.breaker.record(ticket, failed=False, duration=ttft)
        try:
            if self.rate_limit is not None and call.limit_key is not None:
                # Before the readers see the end, so a client's next request is judged
                # with these tokens counted.
                await self.rate_limit.charge(call.limit_key, completion.total_tokens)
            # Stay joinable while storing: a request arriving now gets the full replay.
            flight.finish(completion)
            await self._store(flight, call, completion)
        finally:
            flight.finish(completion)  # a no-op unless charging was cancelled
            self._flights.discard(flight)

    async def _store(self, flight: Flight, call: _Call, completion: Completion) -> None:
        key = call.shared_key
        if key is not None and self.cache is not None and not call.options.no_store:
            entry = {
                "chunks": flight.parts,
                "finish_reason": completion.finish_reason,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            }
            try:
                await self.cache.aset(key, entry, call.options.cache_ttl)
            except Exception:
                logger.exception("could not store %s in the cache", call.request.id)

    def _count_retry(self, error: BaseException, delay: float) -> None:
        self.stats.retries += 1
        logger.info("retrying after %s in %.2f s", type(error).__name__, delay)

    async def _pump(
        self,
        inner: Stream,
        flight: Flight,
        deadlines: Deadlines,
        first_text_at: list[float],
    ) -> Completion:
        source = inner.channel
        while True:
            wait = deadlines.wait_for(started=source.started, has_text=flight.has_text)
            try:
                text = await source.anext_text(wait)
            except StopAsyncIteration:
                return source.completion()
            if text is None:
                timeout = deadlines.passed(started=source.started, has_text=flight.has_text)
                if timeout is not None:
                    raise timeout
                continue
            if not first_text_at:
                first_text_at.append(time.monotonic())
            flight.emit(text)


def _wrap(exc: BaseException) -> BackendError:
    error = BackendError(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _cache_from_config(settings: Mapping[str, Any]) -> Cache:
    options = dict(settings)
    backend = options.pop("backend", "memory")
    if backend == "memory":
        return _build("cache", MemoryCache, options, ValueError)  # type: ignore[no-any-return]
    if backend == "redis":
        if "url" not in options:
            raise ValueError("a redis cache needs a url")
        return _build("cache", RedisCache, options, ValueError)  # type: ignore[no-any-return]
    raise ValueError(f"unknown cache backend {backend!r}: use 'memory' or 'redis'")


def _decode_entry(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if (
        isinstance(value, dict)
        and isinstance(value.get("chunks"), list)
        and all(isinstance(c, str) for c in value["chunks"])
        and isinstance(value.get("finish_reason"), str)
    ):
        return value
    logger.warning("ignoring a malformed cache entry")
    return None


def _replay(entry: dict[str, Any], channel: Channel) -> None:
    channel.start()
    for chunk in entry["chunks"]:
        channel.emit(chunk, 0)
    prompt_tokens = entry.get("prompt_tokens")
    completion_tokens = entry.get("completion_tokens")
    channel.finish(
        entry["finish_reason"],
        prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
        completion_tokens=completion_tokens if isinstance(completion_tokens, int) else None,
    )
