"""What a request is and what it ends as: :class:`Request` and :class:`Completion`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Completion", "Request"]


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
