"""Streams read from threads: chunks, results, timeouts, coalescing, context managers."""

from __future__ import annotations

import threading

import pytest

from llmbridge import Cancelled, Completion, Request, Timeout
from llmbridge._core.stream import Channel, Stream
from llmbridge.testing import SimulatedGenerator, simulated_engine

from support import wait_until

pytestmark = pytest.mark.timeout(30)


def channel() -> Channel:
    return Channel(Request("r-1", "prompt", {}))


def test_iteration_yields_every_chunk_then_stops() -> None:
    """`for chunk in stream` yields the text in order and ends at finish()."""
    ch = channel()
    stream = Stream(ch)
    ch.emit("a")
    ch.emit("b")
    ch.finish("stop", prompt_tokens=1)
    assert list(stream) == ["ab"]  # unread text is coalesced into one chunk
    # Read text is released as it is read (bounded memory): the completion of a stream
    # read to its end carries the metadata, and only the text no read took.
    completion = stream.result()
    assert (completion.text, completion.finish_reason, completion.prompt_tokens) == (
        "",
        "stop",
        1,
    )


def test_unread_text_is_coalesced_not_queued() -> None:
    """A slow reader receives everything pending in one chunk: memory is its own text."""
    ch = channel()
    for i in range(1000):
        ch.emit(str(i % 10))
    reader = iter(Stream(ch))
    assert next(reader) == "0123456789" * 100
    ch.emit("tail")
    assert next(reader) == "tail"


def test_reader_blocks_until_text_arrives_from_another_thread() -> None:
    """A thread waiting in next() is woken by a write from another thread."""
    ch = channel()
    got: list[str] = []
    started = threading.Event()

    def consume() -> None:
        started.set()
        got.extend(Stream(ch))

    t = threading.Thread(target=consume)
    t.start()
    started.wait()
    ch.emit("x")
    ch.emit("y")
    ch.finish()
    t.join(5)
    assert "".join(got) == "xy"


def test_result_timeout_raises_and_cancels() -> None:
    """result(timeout) raises Timeout and cancels the request."""
    cancelled = threading.Event()
    ch = Channel(Request("r", "p", {}), on_cancel=cancelled.set)
    stream = Stream(ch)
    with pytest.raises(Timeout):
        stream.result(timeout=0.05)
    assert cancelled.is_set()
    with pytest.raises(Cancelled):
        stream.result()


def test_failure_reaches_the_reader_after_the_text_before_it() -> None:
    """Text produced before an error is delivered, then the error is raised."""
    ch = channel()
    ch.emit("partial")
    ch.fail(RuntimeError("boom"))
    reader = iter(Stream(ch))
    assert next(reader) == "partial"
    with pytest.raises(RuntimeError, match="boom"):
        next(reader)


def test_writes_after_the_end_are_ignored() -> None:
    """A late emit/finish/fail after cancel changes nothing."""
    ch = channel()
    ch.emit("a")
    assert ch.cancel() is True
    assert ch.emit("b") is False
    assert ch.finish() is False
    assert ch.fail(RuntimeError()) is False
    with pytest.raises(Cancelled):
        Stream(ch).result()


def test_wait_started_raises_an_error_that_came_before_any_text() -> None:
    """wait_started() raises the request's error if it failed before producing text."""
    from llmbridge import Overloaded

    ch = channel()
    ch.fail(Overloaded("full"))
    with pytest.raises(Overloaded):
        Stream(ch).wait_started(timeout=1)
    ok = channel()
    ok.emit("t")
    ok.fail(RuntimeError("late"))
    Stream(ok).wait_started(timeout=1)  # text arrived first: the error is the stream's


def test_wait_started_times_out() -> None:
    """wait_started(timeout) raises Timeout when nothing happens, and cancels the request."""
    ch = channel()
    with pytest.raises(Timeout):
        Stream(ch).wait_started(timeout=0.02)
    with pytest.raises(Cancelled):
        Stream(ch).result()


def test_with_block_cancels_an_unfinished_stream() -> None:
    """Leaving `with stream:` early cancels it; a finished one is untouched."""
    with simulated_engine(step_time=0.002, max_new_tokens=10_000) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        with engine.submit("ctx") as stream:
            next(iter(stream))
        assert wait_until(lambda: stream.id in gen.cancelled)
        with engine.submit("short", max_new_tokens=2) as done:
            text = done.result(timeout=10).text
        assert done.result().text == text


def test_completion_is_immutable_and_counts_tokens() -> None:
    """Completion is a frozen record with token totals."""
    ch = channel()
    ch.start()
    ch.emit("hello", tokens=2)
    ch.finish("stop", prompt_tokens=3)
    completion = Stream(ch).result()
    assert isinstance(completion, Completion)
    assert (completion.prompt_tokens, completion.completion_tokens) == (3, 2)
    assert completion.total_tokens == 5
    with pytest.raises(AttributeError):
        completion.text = "changed"  # type: ignore[misc]


def test_late_on_cancel_hook_runs_if_already_cancelled() -> None:
    """A cancel hook installed after the consumer cancelled still runs (no lost cancel)."""
    ch = channel()
    ch.cancel()
    fired = threading.Event()
    ch.set_on_cancel(fired.set)
    assert fired.is_set()


def test_repr_says_the_state() -> None:
    """repr() shows id and whether the stream ended."""
    ch = channel()
    stream = Stream(ch)
    assert "running" in repr(stream)
    ch.finish()
    assert "ended" in repr(stream)
    assert "r-1" in repr(stream)


def test_iterating_a_temporary_stream_reads_it_whole() -> None:
    """`for chunk in engine.submit(...)` keeps the stream alive while it is read."""
    with simulated_engine(step_time=0.001, max_new_tokens=6) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        text = "".join(chunk for chunk in engine.submit("temporary"))
        assert text == gen.expected_text("temporary", 6)
