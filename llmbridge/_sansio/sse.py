"""Server-sent events, without I/O: framing that no text can break, and a parser.

Chunks travel as JSON (``{"text": ...}``), so newlines, ``data:`` or ``event:`` inside a
chunk are escaped and can never forge or split an event. :func:`encode_event` also frames
arbitrary data safely by splitting it on every line terminator the spec knows.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SSEDecoder",
    "ServerSentEvent",
    "dumps",
    "encode_chunk",
    "encode_comment",
    "encode_done",
    "encode_error",
    "encode_event",
]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _check_field(name: str, value: str) -> None:
    if _LINE_BREAK.search(value):
        raise ValueError(f"an SSE {name} must not contain a line break: {value!r}")


def encode_event(
    data: str,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Frame one event. ``data`` may hold any text: each of its lines gets its own
    ``data:`` field, so a parser rebuilds it with ``\\n`` line ends."""
    parts: list[str] = []
    if event is not None:
        _check_field("event name", event)
        parts.append(f"event: {event}\n")
    if id is not None:
        _check_field("id", id)
        if "\0" in id:
            raise ValueError("an SSE id must not contain NUL")
        parts.append(f"id: {id}\n")
    if retry is not None:
        parts.append(f"retry: {int(retry)}\n")
    for line in _LINE_BREAK.split(data):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode()


def encode_comment(text: str = "") -> bytes:
    """A comment line (a heartbeat that keeps proxies from timing out an idle stream)."""
    lines = _LINE_BREAK.split(text)
    return ("".join(f": {line}\n" if line else ":\n" for line in lines) + "\n").encode()


def dumps(value: Any) -> str:
    """Compact JSON for the wire. Never fails to encode: a lone surrogate (which UTF-8
    can't carry) is written as a ``\\ud800`` escape instead of breaking the response."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = json.dumps(value, separators=(",", ":"))
    return text


_json = dumps


def encode_chunk(text: str) -> bytes:
    """A text chunk: ``data: {"text": ...}``."""
    return encode_event(_json({"text": text}))


def encode_done(payload: dict[str, Any]) -> bytes:
    """The final event: ``event: done`` with finish reason and usage."""
    return encode_event(_json(payload), event="done")


def encode_error(payload: dict[str, Any]) -> bytes:
    """``event: error`` with a JSON problem body."""
    return encode_event(_json(payload), event="error")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One parsed event."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        """``data`` parsed as JSON."""
        return json.loads(self.data)


class SSEDecoder:
    """An incremental parser for ``text/event-stream`` (WHATWG HTML, §9.2.6).

    Feed it text in pieces of any size with :meth:`feed`; it returns the events that
    piece completed. Not thread-safe (one decoder per response).
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None
        self._pending_cr = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")()

    def feed(self, text: str | bytes) -> list[ServerSentEvent]:
        """Parse ``text``; return the events it completed."""
        if isinstance(text, bytes):
            text = self._utf8.decode(text)  # a character may straddle two pieces
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]  # the \n of a \r\n split across two pieces
        self._pending_cr = False
        buffer = self._buffer + text
        events: list[ServerSentEvent] = []
        lines = _LINE_BREAK.split(buffer)
        self._buffer = lines.pop()  # the unterminated rest
        if buffer.endswith("\r") and not self._buffer:
            self._pending_cr = True
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent(
            data="\n".join(self._data),
            event=self._event or "message",
            id=self._last_id,
            retry=self._retry,
        )
        self._data = []
        self._event = ""
        return event
