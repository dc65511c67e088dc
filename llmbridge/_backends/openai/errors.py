"""How an upstream's errors become llmbridge's, without I/O.

An OpenAI-compatible upstream's own 4xx error object is a message written for the API
client: it is relayed (:class:`~llmbridge.UpstreamRejected`, the same status). What
says *our* side is wrong (401, 403, 407: the operator's key) or that the upstream is
failing (429, 5xx, a page that is not an OpenAI error: a wrong base URL) is an
:class:`~llmbridge.UpstreamError`, whose text only the log sees. Which errors count
against an upstream (failover, its breaker) is decided here too.
"""

from __future__ import annotations

from ..._exceptions import LLMBridgeError, Timeout, UpstreamError, UpstreamRejected
from .wire import error_object, message_of, parse_retry_after

__all__ = ["CREDENTIALS", "counts_against", "final_error", "is_429", "status_error"]

#: Statuses that say this server's credentials are wrong for the upstream: never relayed
#: (the upstream's message may echo part of the key).
CREDENTIALS = frozenset({401, 403, 407})
#: Statuses that, without an OpenAI error object, say the upstream is misconfigured (our
#: key, our base URL): the upstream's failure, not the request's.
_MISCONFIGURED = CREDENTIALS | {404, 405}


def status_error(status: int, reason: str, retry_after: str | None, raw: bytes) -> LLMBridgeError:
    """The error for an upstream's error ``status`` (its ``reason`` phrase, its
    ``Retry-After`` header) and body ``raw``.

    A 4xx (not 401, 403, 407 or 429) whose body is an OpenAI error object is the
    upstream refusing the request itself: :class:`~llmbridge.UpstreamRejected` with its
    status and its ``message``, ``type``, ``param`` and ``code`` only. Anything else is
    an :class:`~llmbridge.UpstreamError` that says only its status to a client
    (``retryable`` for 429 and 5xx). Never raises.
    """
    if 400 <= status <= 499 and status not in CREDENTIALS and status != 429:
        fields = error_object(raw)
        if fields is not None:
            return UpstreamRejected(
                fields["message"] or "", upstream_status=status, error_object=fields
            )
    detail = message_of(raw) or reason
    return UpstreamError(
        f"the upstream answered {status}: {detail}",
        upstream_status=status,
        retryable=status == 429 or status >= 500,
        retry_after=parse_retry_after(retry_after),
        summary=f"the upstream refused this server's credentials ({status})"
        if status in CREDENTIALS
        else None,
    )


def is_429(error: LLMBridgeError) -> bool:
    """Whether ``error`` is an upstream's 429 (too many requests)."""
    return isinstance(error, UpstreamError) and error.upstream_status == 429


def counts_against(error: LLMBridgeError) -> bool:
    """Whether ``error`` is the upstream's fault (a failover and a breaker failure), not
    the request's (an :class:`~llmbridge.UpstreamRejected`, a 400) or the consumer's (a
    cancellation)."""
    if isinstance(error, Timeout):
        return True
    if isinstance(error, UpstreamError):
        status = error.upstream_status
        return status is None or status == 429 or status >= 500 or status in _MISCONFIGURED
    return False


def final_error(errors: list[LLMBridgeError], soonest_back: float | None) -> LLMBridgeError:
    """The error a request fails with once every upstream it tried failed it (``errors``,
    in order, at least one): the last one that was not a 429. When every one was a 429,
    a 429 whose ``retry_after`` is the soonest any upstream asked for, else
    ``soonest_back`` (the first cooldown's end), else a second: the client is told to
    slow down, and when."""
    others = [e for e in errors if not is_429(e)]
    if others:
        return others[-1]
    last = errors[-1]
    if len(errors) == 1 and last.retry_after is not None:
        return last
    afters = [e.retry_after for e in errors if e.retry_after is not None]
    wait = min(afters) if afters else soonest_back
    error = UpstreamError(
        last.message if len(errors) == 1 else f"every upstream answered 429: {last.message}",
        upstream_status=429,
        retryable=True,
        retry_after=1.0 if wait is None else wait,
        summary=None if len(errors) == 1 else "every upstream answered 429",
    )
    error.__cause__ = last
    return error
