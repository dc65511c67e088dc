"""What a request is and what it ends as: :class:`Request` and :class:`Completion`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Completion", "Request", "RequestOutcome"]


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a backend sees it.

    ``id`` is unique among its engine's live requests and is the identifier to give a
    backend job;
    ``params`` holds the sampling parameters passed to :meth:`Engine.submit`.
    """

    id: str
    prompt: str
    params: dict[str, Any] = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Completion:
    """The whole outcome of a finished request.

    Timings are in seconds from submission: ``queued`` until a backend slot took the
    request, ``time_to_first_token`` until the first text arrived (``None`` if none did),
    ``total`` until the end.
    """

    id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queued: float
    time_to_first_token: float | None
    total: float

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """How a request went, readable while it runs or after it ended, failed or not.

    What metrics and the per-request log line read. ``finish_reason`` is ``""`` while
    the request runs, else ``"stop"``, ``"length"``, ..., ``"cancelled"`` or
    ``"error"`` (then ``error`` says which); timings are seconds from submission, as in
    :class:`Completion`, with ``total`` so far for a running request. ``notes`` are the
    policies' words for what they did (``"cache_hit"``, ``"coalesced"``).
    """

    id: str
    finish_reason: str
    error: BaseException | None
    prompt_tokens: int
    completion_tokens: int
    queued: float | None
    time_to_first_token: float | None
    total: float
    notes: tuple[str, ...] = ()

    @property
    def ended(self) -> bool:
        """True once the request finished, failed or was cancelled."""
        return self.finish_reason != ""

    @property
    def inter_token_latency(self) -> float | None:
        """The mean gap between two generated tokens, from the first text to the end;
        ``None`` with fewer than two tokens or no text."""
        first = self.time_to_first_token
        if first is None or self.completion_tokens < 2 or not self.ended:
            return None
        return max(0.0, self.total - first) / (self.completion_tokens - 1)
