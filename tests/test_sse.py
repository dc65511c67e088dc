"""SSE framing and parsing: no text can forge or split an event."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmbridge._sansio.sse import (
    SSEDecoder,
    encode_chunk,
    encode_comment,
    encode_done,
    encode_error,
    encode_event,
)

pytestmark = pytest.mark.timeout(60)


def decode_all(data: bytes, piece: int = 0) -> list:  # type: ignore[type-arg]
    decoder = SSEDecoder()
    if not piece:
        return decoder.feed(data)
    events = []
    for i in range(0, len(data), piece):
        events += decoder.feed(data[i : i + piece])
    return events


@given(st.lists(st.text(), min_size=1, max_size=8), st.integers(min_value=0, max_value=7))
@settings(max_examples=300, deadline=None)
def test_any_chunks_round_trip_exactly(chunks: list[str], piece: int) -> None:
    """Chunks of any text survive framing and parsing, fed in pieces of any size."""
    body = b"".join(encode_chunk(c) for c in chunks) + encode_done({"finish_reason": "stop"})
    events = decode_all(body, piece)
    assert [e.json()["text"] for e in events[:-1]] == chunks
    assert events[-1].event == "done"


@pytest.mark.parametrize(
    "evil",
    [
        "a\n\nevent: error\ndata: forged",
        "data: x",
        "event: done",
        "\r\n\r\n",
        "line\rbreak",
        "é€😀",
    ],
)
def test_hostile_chunks_cannot_forge_events(evil: str) -> None:
    """Newlines, `data:` or `event:` inside a chunk stay inside that chunk."""
    events = decode_all(encode_chunk(evil) + encode_chunk("next"))
    assert [e.event for e in events] == ["message", "message"]
    assert events[0].json() == {"text": evil}


def test_raw_data_is_split_on_every_line_terminator() -> None:
    """encode_event gives each line its own data field; the parser rejoins with \\n."""
    (event,) = decode_all(encode_event("a\r\nb\rc\nd", event="x", id="7"))
    assert (event.data, event.event, event.id) == ("a\nb\nc\nd", "x", "7")


def test_field_values_with_line_breaks_are_refused() -> None:
    """An event name or id containing a line break would split the event: refuse it."""
    with pytest.raises(ValueError, match="line break"):
        encode_event("x", event="a\nb")
    with pytest.raises(ValueError, match="line break"):
        encode_event("x", id="1\r2")


def test_comments_are_ignored_by_parsers() -> None:
    """Heartbeat comments produce no events."""
    assert decode_all(encode_comment() + encode_comment("keep\nalive")) == []
    assert encode_comment() == b":\n\n"


def test_done_and_error_events_carry_json() -> None:
    """The final events are JSON objects under their event names."""
    events = decode_all(encode_error({"status": 503}) + encode_done({"finish_reason": "length"}))
    assert [(e.event, json.loads(e.data)) for e in events] == [
        ("error", {"status": 503}),
        ("done", {"finish_reason": "length"}),
    ]


def test_multibyte_characters_split_across_pieces() -> None:
    """A UTF-8 character split between two network reads is decoded once whole."""
    data = encode_chunk("😀")
    events = decode_all(data, piece=1)
    assert events[0].json()["text"] == "😀"


def test_retry_and_crlf_streams() -> None:
    """retry fields are parsed; CRLF line ends split across pieces don't double-dispatch."""
    raw = b"retry: 1500\r\ndata: one\r\n\r\ndata: two\r\n\r\n"
    for piece in (0, 1, 2, 3):
        events = decode_all(raw, piece)
        assert [e.data for e in events] == ["one", "two"]
        assert events[0].retry == 1500


def test_lone_surrogates_are_escaped_not_an_encoding_error() -> None:
    """A chunk holding a lone surrogate (which UTF-8 can't carry) is framed as a JSON
    escape, and the parser gives the same string back; ordinary text stays unescaped."""
    evil = "a\ud800b"
    events = SSEDecoder().feed(encode_chunk(evil))
    assert events[0].json() == {"text": evil}
    assert "é".encode() in encode_chunk("é")
