"""The request path of a :class:`~llmbridge.policies.Pipeline`, on the background loop.

After admission (rate limit, cache lookup) a request takes one of two paths:

- **direct**, whenever nothing needs a copy of its text (no single-flight sharing, no
  cache store): each attempt is a job of the engine that writes straight into the
  caller's own channel, opened by :meth:`Engine.open_request` under the caller's id. The
  text is held once, in that channel; the loop only sees each attempt's end (a
  :class:`~llmbridge.backends.JobSink`) and the deadlines. A retry before the first token
  is a new job into the same channel, so the caller never sees the failed attempt.
- **flight**, for single-flight and cached requests: one backend job fanned out by a
  :class:`~llmbridge._policies.singleflight.Flight` to every reader, which keeps the text
  for late joiners and the cache. Its job still carries the leader's id.

Both wrap their attempts in the same policies: circuit breaker → retries before the
first token → timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .._core.channel import Channel, Completion, Request
from .._core.engine import Engine
from .._core.jobs import Job
from .._core.stream import Stream
from .._exceptions import BackendError, BadRequest, Cancelled, LLMBridgeError, Overloaded, Timeout
from .breaker import Ticket
from .options import CallOptions
from .retry import retrying
from .singleflight import Flight
from .timeouts import Deadlines

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["Call", "fly", "run_direct"]

logger = logging.getLogger("llmbridge")


class Call:
    """One request as the pipeline tracks it on the loop."""

    __slots__ = ("channel", "direct", "flight", "job", "limit_key", "options", "shared_key", "task")

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
        #: The direct path's task and current attempt, for cancellation.
        self.direct = False
        self.task: asyncio.Task[Any] | None = None
        self.job: Job | None = None

    @property
    def request(self) -> Request:
        """The caller's request (its id is the engine's and the backend job's)."""
        return self.channel.request


class _Sink:
    """Hands one attempt's end from the engine's thread to the loop (a JobSink)."""

    __slots__ = ("loop", "outcome")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.outcome: asyncio.Future[tuple[str, Any]] = loop.create_future()

    def _set(self, value: tuple[str, Any]) -> None:
        if not self.outcome.done():
            self.outcome.set_result(value)

    def _post(self, value: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self._set, value)
        except RuntimeError:
            pass  # the loop is gone (interpreter shutdown)

    def job_finished(
        self,
        job: Job,
        finish_reason: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        self._post(("finished", (finish_reason, prompt_tokens, completion_tokens)))

    def job_failed(self, job: Job, error: BaseException) -> None:
        self._post(("failed", error))


def counts_against_backend(error: BaseException) -> bool:
    """Whether an error says the backend is unhealthy (for the circuit breaker)."""
    if isinstance(error, Cancelled | BadRequest | Overloaded):
        return False
    if isinstance(error, LLMBridgeError):
        return isinstance(error, BackendError | Timeout)
    return True


def wrap(exc: BaseException, request_id: str) -> BackendError:
    """A policy's own unexpected exception as a :class:`BackendError`, logged once."""
    logger.error("request %s: the policy pipeline failed", request_id, exc_info=exc)
    error = BackendError(f"the policy pipeline failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


async def _attempts(
    pipeline: Pipeline,
    call: Call,
    deadlines: Deadlines,
    attempt: Callable[[], Awaitable[Completion]],
    has_text: Callable[[], bool],
    first_text_at: Callable[[], float | None],
) -> Completion:
    """Circuit breaker → retries before the first token → ``attempt()``; raises the
    request's :class:`LLMBridgeError`."""
    breaker = pipeline.breaker
    ticket: Ticket | None = None
    try:
        if breaker is not None:
            try:
                ticket = breaker.admit()
            except LLMBridgeError:
                pipeline.stats.circuit_open += 1
                raise
        started = time.monotonic()
        if pipeline.retry is not None and call.options.retry:

            def may_retry(error: BaseException) -> bool:
                return not has_text() and bool(getattr(error, "retryable", False))

            completion = await retrying(
                attempt,
                pipeline.retry,
                may_retry=may_retry,
                deadline=deadlines.end,
                on_retry=pipeline._count_retry,
            )
        else:
            completion = await attempt()
    except asyncio.CancelledError:
        # Nobody is left reading: the backend job was cancelled with the attempt.
        if ticket is not None and breaker is not None:
            breaker.release(ticket)
        raise
    except Exception as exc:
        error = exc if isinstance(exc, LLMBridgeError) else wrap(exc, call.request.id)
        if isinstance(error, Timeout):
            pipeline.stats.timeouts += 1
        if ticket is not None and breaker is not None:
            if counts_against_backend(error):
                breaker.record(ticket, failed=True)
            else:
                breaker.release(ticket)
        raise error from error.__cause__
    if ticket is not None and breaker is not None:
        first = first_text_at()
        breaker.record(ticket, failed=False, duration=None if first is None else first - started)
    return completion


async def run_direct(pipeline: Pipeline, call: Call) -> None:
    """The direct path: every attempt writes into the caller's channel."""
    engine = pipeline.engine
    assert isinstance(engine, Engine)
    channel = call.channel
    deadlines = Deadlines(call.options.timeouts or pipeline.timeouts, call.request.submitted_at)
    ending: tuple[str, int | None, int | None] = ("stop", None, None)

    async def attempt() -> Completion:
        nonlocal ending
        pipeline.stats.backend_calls += 1
        deadlines.attempt_started(time.monotonic())
        sink = _Sink(asyncio.get_running_loop())
        job = engine.submit_job(channel, sink=sink)
        call.job = job
        if channel.ended:
            job.cancel()  # the consumer left while we submitted
        outcome = sink.outcome
        try:
            while not outcome.done():
                wait = deadlines.wait_for(started=job.started, has_text=channel.has_text)
                await asyncio.wait((outcome,), timeout=wait)
                if outcome.done():
                    break
                timeout = deadlines.passed(started=job.started, has_text=channel.has_text)
                if timeout is not None:
                    raise timeout
        finally:
            if not outcome.done():
                job.cancel()  # a deadline or a cancelled call stops the backend job
        kind, value = outcome.result()
        if kind == "failed":
            raise value
        ending = value
        reason, prompt_tokens, completion_tokens = value
        return Completion(
            id=channel.request.id,
            text="",
            finish_reason=reason,
            prompt_tokens=prompt_tokens or 0,
            completion_tokens=(
                channel.completion_tokens if completion_tokens is None else completion_tokens
            ),
            queued=0.0,
            time_to_first_token=None,
            total=0.0,
        )

    try:
        completion = await _attempts(
            pipeline,
            call,
            deadlines,
            attempt,
            lambda: channel.has_text,
            lambda: channel.first_text_at,
        )
    except LLMBridgeError as error:
        channel.fail(error)
        return
    reason, prompt_tokens, completion_tokens = ending
    try:
        if pipeline.rate_limit is not None and call.limit_key is not None:
            # Before the reader sees the end, so a client's next request is judged with
            # these tokens counted.
            await pipeline.rate_limit.charge(call.limit_key, completion.total_tokens)
    finally:
        channel.finish(reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def _open_inner(pipeline: Pipeline, request: Request) -> Stream:
    """The flight's own backend request, under the leader's id."""
    engine = pipeline.engine
    if isinstance(engine, Engine):
        channel = Channel(request, max_unread=engine.max_unread)
        job = engine.submit_job(channel)
        channel.set_on_cancel(job.cancel)
        return Stream(channel)
    return engine.submit(request.prompt, request_id=request.id, **request.params)


async def fly(pipeline: Pipeline, flight: Flight, call: Call) -> None:
    """The flight path: one backend job fanned out to every reader of ``flight``."""
    request = call.request
    deadlines = Deadlines(call.options.timeouts or pipeline.timeouts, request.submitted_at)
    first_text_at: list[float] = []

    async def attempt() -> Completion:
        pipeline.stats.backend_calls += 1
        deadlines.attempt_started(time.monotonic())
        inner = _open_inner(pipeline, request)
        try:
            return await _pump(inner, flight, deadlines, first_text_at)
        finally:
            inner.close()  # a timeout or a cancelled flight stops the backend job

    try:
        completion = await _attempts(
            pipeline,
            call,
            deadlines,
            attempt,
            lambda: flight.has_text,
            lambda: first_text_at[0] if first_text_at else None,
        )
    except asyncio.CancelledError:
        flight.fail(Cancelled("every reader left"))
        raise
    except LLMBridgeError as error:
        pipeline._flights.discard(flight)
        flight.fail(error)
        return
    try:
        if pipeline.rate_limit is not None and call.limit_key is not None:
            await pipeline.rate_limit.charge(call.limit_key, completion.total_tokens)
        # Stay joinable while storing: a request arriving now gets the full replay.
        flight.finish(completion)
        await _store(pipeline, flight, call, completion)
    finally:
        flight.finish(completion)  # a no-op unless charging was cancelled
        pipeline._flights.discard(flight)


async def _store(pipeline: Pipeline, flight: Flight, call: Call, completion: Completion) -> None:
    key = call.shared_key
    cache = pipeline.cache
    if key is not None and cache is not None and not call.options.no_store:
        entry = {
            "chunks": flight.parts,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        }
        try:
            await cache.aset(key, entry, call.options.cache_ttl)
        except Exception:
            logger.exception("could not store %s in the cache", call.request.id)


async def _pump(
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


def decode_entry(value: Any) -> dict[str, Any] | None:
    """A cache entry as stored by :func:`fly`, or ``None`` (missing or malformed)."""
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


def replay(entry: dict[str, Any], channel: Channel) -> None:
    """Answer ``channel`` from a cache entry."""
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
