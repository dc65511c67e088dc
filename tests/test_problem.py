"""llmbridge/_sansio/problem.py: problem objects and Retry-After, whatever the error."""

from __future__ import annotations

import json
import math

import pytest

from llmbridge import BackendError, LLMBridgeError, Overloaded, RateLimited, UpstreamError
from llmbridge._sansio.problem import problem, problem_headers, problem_status, retry_after_value


class Odd(LLMBridgeError):
    """A subclass with values no HTTP response can carry."""

    status = 42


@pytest.mark.parametrize(
    ("after", "header", "field"),
    [
        (math.inf, "86400", 86400.0),
        (-math.inf, "0", 0.0),
        (math.nan, None, None),
        (1e999, "86400", 86400.0),
        (-3.0, "0", 0.0),
        (0.2, "1", 0.2),
        (None, None, None),
    ],
)
def test_retry_after_is_clamped_or_dropped(
    after: float | None, header: str | None, field: float | None
) -> None:
    """inf/-inf/nan/negative retry_after: the header is whole seconds in [0, one day] or
    absent, the body field is finite or absent, and the body is valid JSON."""
    error = Overloaded("busy", retry_after=after)
    assert retry_after_value(error) == header
    assert problem_headers(error).get("Retry-After") == header
    body = problem(error)
    assert body.get("retry_after") == field
    assert json.loads(json.dumps(body, allow_nan=False)) == body


def test_values_set_after_construction_never_raise() -> None:
    """A retry_after replaced by something that is no number, or a status outside
    400-599, still gives a 500 problem without Retry-After."""
    error = RateLimited("x")
    error.retry_after = "soon"  # type: ignore[assignment]
    assert retry_after_value(error) is None
    assert "retry_after" not in problem(error)
    odd = Odd("odd")
    assert problem_status(odd) == 500
    assert problem(odd)["status"] == 500
    assert problem_status(RuntimeError("x")) == 500


def test_backend_text_is_replaced_by_a_generic_detail_with_the_request_id() -> None:
    """A BackendError's message (which may hold secrets) never reaches the body; the
    detail names the request id to look up in the log."""
    secret = "redis://:hunter2@cache:6379"
    body = problem(BackendError(f"failed: {secret}"), "req-9")
    assert secret not in json.dumps(body)
    assert body["request_id"] == "req-9"
    assert "req-9" in body["detail"]
    upstream = UpstreamError(f"upstream said {secret}", upstream_status=500)
    assert secret not in json.dumps(problem(upstream))
    assert problem(upstream)["detail"] == "the upstream answered 500"
