"""StreamBody: SSE and text bodies over a stream, from threads and coroutines."""

from __future__ import annotations

import pytest

from llmbridge import Overloaded
from llmbridge._core.stream import Channel, Request, Stream
from llmbridge._sansio.problem import problem
from llmbridge._sansio.sse import SSEDecoder
from llmbridge._web.body import StreamBody
from llmbridge.testing import SimulatedGenerator, simulated_engine

from support import wait_until

pytestmark = pytest.mark.timeout(30)


def events_of(body: bytes) -> list:  # type: ignore[type-arg]
    return SSEDecoder().feed(body)


def test_sse_body_streams_chunks_then_done_with_usage() -> None:
    """Each chunk is an event; the last event carries finish reason and usage."""
    with simulated_engine(step_time=0.001, max_new_tokens=5) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        body = StreamBody(engine.submit("sse body"), heartbeat=None)
        events = events_of(b"".join(body))
    assert "".join(e.json()["text"] for e in events[:-1]) == gen.expected_text("sse body", 5)
    done = events[-1]
    assert done.event == "done"
    assert done.json()["finish_reason"] == "length"
    assert done.json()["usage"]["completion_tokens"] == 5


def test_sse_body_sends_heartbeats_while_silent() -> None:
    """A comment goes out every `heartbeat` seconds while nothing is produced."""
    ch = Channel(Request("r", "p", {}))
    body = iter(StreamBody(Stream(ch), heartbeat=0.01))
    assert next(body) == b":\n\n"
    ch.emit("hi")
    assert events_of(next(body))[0].json() == {"text": "hi"}


def test_error_becomes_an_error_event_with_a_problem_body() -> None:
    """A failure mid-stream ends the body with `event: error` and a JSON problem."""
    ch = Channel(Request("r", "p", {}))
    ch.emit("part")
    ch.fail(Overloaded("busy", retry_after=2))
    events = events_of(b"".join(StreamBody(Stream(ch), heartbeat=None)))
    assert events[-1].event == "error"
    assert events[-1].json()["status"] == 503
    assert events[-1].json()["retry_after"] == 2


def test_internal_errors_do_not_leak_details() -> None:
    """Non-llmbridge errors become a generic 500 problem without the exception text."""
    assert problem(RuntimeError("secret path /etc/x"))["detail"] == "the request failed"


def test_closing_the_body_cancels_the_job() -> None:
    """A WSGI server's close() on the body cancels the engine job."""
    with simulated_engine(step_time=0.002, max_new_tokens=10_000) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        stream = engine.submit("closing")
        closed = []
        body = StreamBody(stream, on_close=lambda: closed.append(1))
        it = iter(body)
        next(it)
        body.close()
        body.close()
        assert closed == [1]
        assert wait_until(lambda: stream.id in gen.cancelled)


@pytest.mark.anyio
async def test_async_iteration_matches_sync() -> None:
    """`async for` over a body yields the same bytes as `for`."""
    with simulated_engine(step_time=0.001, max_new_tokens=5) as engine:
        body = StreamBody(engine.submit("same"), heartbeat=None)
        async_bytes = b"".join([chunk async for chunk in body])
        sync_bytes = b"".join(StreamBody(engine.submit("same"), heartbeat=None))

    def summary(body: bytes) -> tuple[str, dict[str, object]]:
        events = events_of(body)  # chunking may differ: compare text and final event
        done = {k: v for k, v in events[-1].json().items() if k != "id"}
        return "".join(e.json()["text"] for e in events[:-1]), done

    assert summary(async_bytes) == summary(sync_bytes)


def test_text_format_is_raw_utf8() -> None:
    """format='text' sends the chunks' bytes as they are."""
    ch = Channel(Request("r", "p", {}))
    ch.emit("héllo ")
    ch.emit("wörld")
    ch.finish()
    body = StreamBody(Stream(ch), format="text")
    assert b"".join(body).decode() == "héllo wörld"
    assert body.media_type.startswith("text/plain")


def test_bad_options_are_refused() -> None:
    """Unknown formats and non-positive heartbeats fail at construction."""
    stream = Stream(Channel(Request("r", "p", {})))
    with pytest.raises(ValueError, match="format"):
        StreamBody(stream, format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heartbeat"):
        StreamBody(stream, heartbeat=0)


def test_a_custom_framer_shapes_every_byte_and_the_early_error() -> None:
    """framer= replaces the built-in formats: head, chunks, end, and the whole error
    response a server sends for a failure before the first byte."""
    from llmbridge._sansio.framing import Reply

    class Brackets:
        media_type = "text/x-brackets"
        heartbeats = False

        def head(self) -> bytes:
            return b"<"

        def text(self, text: str) -> bytes:
            return f"[{text}]".encode()

        def heartbeat(self) -> bytes:
            raise AssertionError("never sent: heartbeats is false")

        def end(self, outcome: object) -> bytes:
            return b">"

        def error(self, error: BaseException) -> bytes:
            return b"!"

        def error_response(self, error: BaseException) -> Reply:
            return Reply(418, b"teapot", [("Content-Type", "text/plain")])

    ch = Channel(Request("r", "p", {}))
    ch.emit("a")
    ch.emit("b")
    ch.finish()
    body = StreamBody(Stream(ch), framer=Brackets(), heartbeat=0.01)
    assert body.media_type == "text/x-brackets"
    assert body.heartbeat is None
    out = b"".join(body)
    # Chunks may coalesce ("[ab]") or not ("[a][b]"): the framing is what matters.
    assert out in (b"<[ab]>", b"<[a][b]>"), out
    assert body.error_response(Overloaded("busy")).status == 418


@pytest.mark.anyio
async def test_a_failure_after_text_ends_with_the_framers_error_both_ways() -> None:
    """The sync and the async loop end a failed stream with framer.error()'s bytes."""
    from llmbridge._sansio.framing import SSEFramer

    def failed() -> Stream:
        ch = Channel(Request("r", "p", {}))
        ch.emit("x")
        ch.fail(Overloaded("busy"))
        return Stream(ch)

    sync = b"".join(StreamBody(failed(), framer=SSEFramer(), heartbeat=None))
    async_ = b"".join([c async for c in StreamBody(failed(), framer=SSEFramer(), heartbeat=None)])
    assert sync == async_
    assert events_of(sync)[-1].event == "error"


def test_built_in_error_responses_are_problem_json_with_retry_after() -> None:
    """An early failure of an SSE or text body is answered as problem+json."""
    stream = Stream(Channel(Request("r", "p", {})))
    for format in ("sse", "text"):
        body = StreamBody(stream, format=format)  # type: ignore[arg-type]
        reply = body.error_response(Overloaded("busy", retry_after=2))
        headers = dict(reply.headers)
        assert reply.status == 503
        assert headers["Content-Type"] == "application/problem+json"
        assert headers["Retry-After"] == "2"
