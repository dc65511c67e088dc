"""The OpenAI-compatible HTTP backend: :class:`OpenAIBackend` over one or more
:class:`Upstream` servers (``backend``: the engine side; ``upstreams``: balancing, a
breaker and metrics per upstream; ``wire``: request bodies and answers, without I/O)."""

from __future__ import annotations

from .backend import OpenAIBackend
from .upstreams import Upstream

__all__ = ["OpenAIBackend", "Upstream"]
