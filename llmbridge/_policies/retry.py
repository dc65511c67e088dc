"""Retries before the first token, built on tenacity.

A request is tried again only while nothing of it has reached its consumer (after the
first chunk, a retry would repeat or contradict text the user already saw), only for
errors whose ``retryable`` is true (:class:`~llmbridge.Overloaded`, a retryable
:class:`~llmbridge.UpstreamError`), and with jittered exponential backoff ("full
jitter": a uniform wait between 0 and ``initial * 2**n``, capped at ``max_backoff``),
never shorter than the error's own ``retry_after`` when that fits under the cap.

This is the only retry layer: turn an upstream SDK's own retries off (``max_retries=0``
for the OpenAI client), or the attempts multiply.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Retry", "retrying"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Retry:
    """How often and how patiently to retry a request that failed before its first token.

    ``attempts`` counts the first try (``attempts=3``: up to two retries). Raises
    ``ValueError`` on bad values.
    """

    attempts: int = 3
    initial: float = 0.1
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ValueError(f"attempts must be an int >= 1, got {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {self.attempts!r}")
        if not self.initial > 0:
            raise ValueError(f"initial must be > 0 seconds, got {self.initial!r}")
        if not self.max_backoff >= self.initial:
            raise ValueError(
                f"max_backoff ({self.max_backoff!r}) must be >= initial ({self.initial!r})"
            )


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    policy: Retry,
    *,
    may_retry: Callable[[BaseException], bool],
    deadline: float | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Await ``attempt()`` until it succeeds, ``may_retry(error)`` is false, the attempts
    run out or the next wait would pass ``deadline`` (monotonic); then raise the last
    error. Cancelling the awaiting task stops at once."""
    try:
        import tenacity
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('retries need tenacity: pip install "llmbridge[retry]"') from exc

    base_wait = tenacity.wait_random_exponential(multiplier=policy.initial, max=policy.max_backoff)

    def wait(state: tenacity.RetryCallState) -> float:
        delay = float(base_wait(state))
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        hint = getattr(error, "retry_after", None)
        if isinstance(hint, int | float) and not isinstance(hint, bool):
            delay = max(delay, min(float(hint), policy.max_backoff))
        return delay

    def stop(state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= policy.attempts:
            return True
        if deadline is None:
            return False
        return time.monotonic() + (state.upcoming_sleep or 0.0) >= deadline

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            error = state.outcome.exception()
            if error is not None:
                on_retry(error, state.upcoming_sleep)

    def retry(state: tenacity.RetryCallState) -> bool:
        outcome = state.outcome
        if outcome is None or not outcome.failed:
            return False
        error = outcome.exception()
        return error is not None and isinstance(error, Exception) and may_retry(error)

    controller: Any = tenacity.AsyncRetrying(
        stop=stop, wait=wait, retry=retry, before_sleep=before_sleep, reraise=True
    )
    result: T = await controller(attempt)
    return result
