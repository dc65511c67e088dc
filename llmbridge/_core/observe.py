"""The engine's observer hook: how metrics learn what the engine does, at no cost when
nobody observes.

An :class:`Observer` is told of each admission, each refusal at admission, each backend
step (with its batch size) and each request's end (with its channel, whose
:meth:`~llmbridge._core.channel.Channel.outcome` holds the timings and tokens). The core
knows only this protocol; :mod:`llmbridge.metrics` implements it with prometheus-client.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .channel import Channel

__all__ = ["Observer"]


@runtime_checkable
class Observer(Protocol):
    """What an :class:`~llmbridge.Engine` tells about its requests (``engine.observer``).

    Every method is called on whatever thread did the thing (a submitter's thread, the
    engine thread, a consumer that cancelled); :meth:`request_rejected` under the
    engine's admission lock, the others outside it. None may block or call back into the
    engine; an exception is logged and dropped, never reaching a request.
    """

    def request_admitted(self) -> None:
        """A request was admitted to the engine's queue."""

    def request_rejected(self, error: BaseException) -> None:
        """A submit was refused at once (``Overloaded``): no request exists."""

    def request_ended(self, channel: Channel) -> None:
        """A request ended (finished, failed, cancelled): once per request, retries or
        not, read ``channel.outcome()``."""

    def job_ended(self) -> None:
        """A backend job ended: the engine's running count changed (a cancelled
        request's job ends after its channel, once the engine thread dropped it)."""

    def step(self, batch_size: int) -> None:
        """The backend ran one step (or dispatched one batch) of ``batch_size`` requests."""
