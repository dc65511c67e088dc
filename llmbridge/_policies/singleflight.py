"""Single-flight: identical requests in flight at once share one backend job.

A :class:`Flight` is one backend job and the channels of every request reading it. It
keeps the text produced so far, so a request that joins late first receives all of it,
then the live rest; each channel is its own consumer's, so cancelling one leaves the
others reading. When the last reader leaves, :meth:`Flight.leave` says so and the owner
cancels the backend job.

Flights and their groups are confined to one event loop (the process's background loop):
every method runs there, so a join, an emit and a leave never interleave, and no chunk
is lost or repeated for a joiner.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .._core.stream import Channel, Completion

__all__ = ["Flight", "FlightGroup"]

_RUNNING, _FINISHED, _FAILED = "running", "finished", "failed"


class Flight:
    """One backend job fanned out to the channels of every request that reads it.

    Loop-confined: call every method on the loop that runs the flight.
    """

    __slots__ = (
        "_error",
        "_finish",
        "_state",
        "joined",
        "key",
        "parts",
        "readers",
        "task",
    )

    def __init__(self, key: str | None = None) -> None:
        self.key = key
        self.parts: list[str] = []
        self.readers: set[Channel] = set()
        self.task: asyncio.Task[Any] | None = None
        #: Every channel that ever joined (the leader included).
        self.joined = 0
        self._state = _RUNNING
        self._error: BaseException | None = None
        self._finish: tuple[str, int, int] | None = None

    def __repr__(self) -> str:
        return f"<Flight {self.key} {self._state} readers={len(self.readers)}>"

    @property
    def running(self) -> bool:
        """True until the backend job finished or failed."""
        return self._state == _RUNNING

    @property
    def has_text(self) -> bool:
        """True once some text reached the readers (no retry may happen after that)."""
        return bool(self.parts)

    def join(self, channel: Channel) -> None:
        """Add a reader: it gets the text so far at once, then the live rest (or the end)."""
        self.joined += 1
        channel.start()
        if self.parts:
            channel.emit("".join(self.parts), 0)
        if self._state == _FINISHED:
            assert self._finish is not None
            reason, prompt_tokens, completion_tokens = self._finish
            channel.finish(reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        elif self._state == _FAILED:
            assert self._error is not None
            channel.fail(self._error)
        elif not channel.ended:
            self.readers.add(channel)

    def leave(self, channel: Channel) -> bool:
        """Remove a reader. True if it was the last one of a running flight: the owner
        must now cancel the backend job."""
        if channel not in self.readers:
            return False
        self.readers.discard(channel)
        return not self.readers and self._state == _RUNNING

    def emit(self, text: str) -> None:
        """Send ``text`` to every reader and keep it for late joiners."""
        self.parts.append(text)
        for channel in self.readers:
            channel.emit(text, 0)

    def finish(self, completion: Completion) -> None:
        """End every reader with ``completion``'s finish reason and token counts."""
        if self._state != _RUNNING:
            return
        self._state = _FINISHED
        self._finish = (
            completion.finish_reason,
            completion.prompt_tokens,
            completion.completion_tokens,
        )
        readers, self.readers = self.readers, set()
        for channel in readers:
            channel.finish(
                completion.finish_reason,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
            )

    def fail(self, error: BaseException) -> None:
        """End every reader with ``error``."""
        if self._state != _RUNNING:
            return
        self._state = _FAILED
        self._error = error
        readers, self.readers = self.readers, set()
        for channel in readers:
            channel.fail(error)


class FlightGroup:
    """The flights in progress, by key. Loop-confined like :class:`Flight`."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: str) -> Flight | None:
        """The flight for ``key`` that a new request may join, if any."""
        return self._flights.get(key)

    def add(self, flight: Flight) -> None:
        """Register ``flight`` under its key (replacing none: check :meth:`get` first)."""
        assert flight.key is not None
        self._flights[flight.key] = flight

    def discard(self, flight: Flight) -> None:
        """Forget ``flight`` if it is still the one registered under its key."""
        if flight.key is not None and self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def clear(self) -> None:
        """Forget every flight (after a fork: they belong to the parent)."""
        self._flights.clear()
