"""Channels: bounded unread text per stream, released when read or closed; max_output."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import textwrap
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from llmbridge import Engine, SlowConsumer
from llmbridge._core.channel import Channel, Request
from llmbridge.backends import StepBackend
from llmbridge.testing import SimulatedGenerator

from support import PYTHON, free_port, run_server, wait_until

pytestmark = pytest.mark.timeout(60)

FLASK_BIN = str(Path(PYTHON).parent / "flask")
TOKEN_MAX = max(len(t) for t in SimulatedGenerator().vocabulary)


def step_engine(generator: SimulatedGenerator, **options: object) -> Engine:
    backend = StepBackend(generator, generator.make_job, max_batch_size=8)
    return Engine(backend, **options)  # type: ignore[arg-type]


class NoPauseGenerator(SimulatedGenerator):
    """A step generator that can't pause a job (as ExLlamaV2's)."""

    pause = None  # type: ignore[assignment]
    resume = None  # type: ignore[assignment]


def test_a_step_job_whose_reader_lags_is_paused_and_neighbours_go_on() -> None:
    """A reader max_unread behind pauses its own job (no busy loop: the engine idles);
    a neighbour finishes meanwhile with its exact text; reading resumes the job."""
    gen = SimulatedGenerator(step_time=0.0005, tokens_per_step=4)
    with step_engine(gen, max_unread=200) as engine:
        slow = engine.submit("slow reader", max_new_tokens=400)
        assert wait_until(lambda: gen.paused == 1)
        channel = slow.channel
        assert 200 <= channel._unread <= 200 + 4 * TOKEN_MAX
        neighbour = engine.submit("fast reader", max_new_tokens=50)
        assert neighbour.result(timeout=10).text == gen.expected_text("fast reader", 50)
        assert wait_until(lambda: engine.in_flight == 1 and gen.paused == 1)
        steps = engine.stats.steps
        assert not wait_until(lambda: engine.stats.steps != steps, timeout=0.2)
        assert channel._unread <= 200 + 4 * TOKEN_MAX
        text = []
        for chunk in slow:
            assert len(chunk) <= 200 + 4 * TOKEN_MAX
            text.append(chunk)
        assert "".join(text) == gen.expected_text("slow reader", 400)
        assert gen.pauses >= 1
        assert gen.concurrent_entries == 0


def test_a_step_job_that_cannot_pause_ends_with_slow_consumer() -> None:
    """Without pause(), the lagging request ends with SlowConsumer (503) after the text
    it had; its neighbour is untouched."""
    gen = NoPauseGenerator(step_time=0.0005, tokens_per_step=4)
    with step_engine(gen, max_unread=200) as engine:
        slow = engine.submit("slow", max_new_tokens=400)
        assert wait_until(lambda: slow.done)
        neighbour = engine.submit("other", max_new_tokens=30)
        assert neighbour.result(timeout=10).text == gen.expected_text("other", 30)
        received = []
        reader = iter(slow)
        with pytest.raises(SlowConsumer) as info:  # noqa: PT012 - read up to the error
            while True:
                received.append(next(reader))
        assert info.value.status == 503
        text = "".join(received)
        assert 200 <= len(text) <= 200 + 4 * TOKEN_MAX
        assert gen.expected_text("slow", 400).startswith(text)
        assert slow.id in gen.cancelled


def test_a_sync_generator_blocks_while_its_reader_lags() -> None:
    """A callable's worker thread waits between chunks while max_unread are unread."""
    produced = 0
    closed = threading.Event()

    def endless(prompt: str) -> Iterator[str]:
        nonlocal produced
        try:
            for _ in range(10_000):
                produced += 1
                yield "x" * 100
        finally:
            closed.set()

    with Engine(endless, max_unread=1_000) as engine:
        stream = engine.submit("go")
        assert wait_until(lambda: produced >= 10)
        assert not wait_until(lambda: produced > 11, timeout=0.2)
        assert stream.channel._unread <= 1_000 + 100
        reader = iter(stream)
        total = 0
        for _ in range(30):
            total += len(next(reader))
        assert total >= 30 * 100
        assert produced < 10 + 31 * 11
        stream.close()
        assert closed.wait(10)


def test_an_async_generator_awaits_while_its_reader_lags() -> None:
    """An async generator on the engine loop awaits room instead of filling memory."""
    produced = 0

    async def endless(prompt: str) -> AsyncIterator[str]:
        nonlocal produced
        for _ in range(10_000):
            produced += 1
            yield "y" * 100
            await asyncio.sleep(0)

    with Engine(endless, max_unread=1_000) as engine:
        stream = engine.submit("go")
        assert wait_until(lambda: produced >= 10)
        assert not wait_until(lambda: produced > 11, timeout=0.2)
        assert stream.channel._unread <= 1_100
        stream.close()


def test_result_reads_as_it_waits_so_a_bounded_producer_never_stalls() -> None:
    """result() on a long output completes with all of it despite a small max_unread."""

    def long(prompt: str) -> Iterator[str]:
        for n in range(2_000):
            yield f"{n},"

    with Engine(long, max_unread=64) as engine:
        text = engine.submit("go").result(timeout=20).text
    assert text == "".join(f"{n}," for n in range(2_000))


def test_max_output_cuts_a_callable_that_ignores_max_tokens() -> None:
    """max_output caps one request's characters: finish "length", the generator closed."""
    closed = threading.Event()

    def babbler(prompt: str, **params: object) -> Iterator[str]:
        try:
            while True:
                yield "blah "
        finally:
            closed.set()

    with Engine(babbler, max_output=1_003) as engine:
        completion = engine.submit("go", max_tokens=5).result(timeout=10)
        assert (len(completion.text), completion.finish_reason) == (1_003, "length")
        assert completion.text == ("blah " * 201)[:1_003]
        assert closed.wait(10)
        assert wait_until(
            lambda: engine.stats.completed == engine.stats.submitted == 1 and engine.in_flight == 0
        )


def test_read_text_is_released_and_close_releases_the_rest() -> None:
    """A channel forgets what its reader took; closing an unread stream frees its text."""
    gen = SimulatedGenerator(step_time=0.0, tokens_per_step=50, vocabulary=("z" * 1000,))
    tracemalloc.start()
    try:
        with step_engine(gen, max_unread=900_000) as engine:
            stream = engine.submit("big", max_new_tokens=10_000)  # would be 10 MB
            assert wait_until(lambda: gen.paused == 1)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
            assert stream.channel._unread >= 900_000
            stream.close()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            assert held - after >= 800_000  # all but the step in hand
    finally:
        tracemalloc.stop()


def test_a_channel_has_no_dead_accessors() -> None:
    """snapshot() and .error are gone (nothing used them)."""
    channel = Channel(Request("r", "p"))
    assert not hasattr(channel, "snapshot")
    assert not hasattr(type(channel), "error")


APP = textwrap.dedent(
    """
    import os
    import resource

    from flask import Flask

    from llmbridge import Engine
    from llmbridge.flask import FlaskBridge

    CHUNK = "x" * 4096


    def produce(prompt):
        for _ in range(5_000):  # 20 MB of text per request
            yield CHUNK


    engine = Engine(produce, max_unread=int(os.environ["MAX_UNREAD"]))
    app = Flask(__name__)
    bridge = FlaskBridge(app, engine=engine)


    @app.get("/big")
    def big():
        return bridge.stream_response("go")


    @app.get("/rss")
    def rss():
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return {"rss": pages * os.sysconf("SC_PAGE_SIZE")}
    """
)


@pytest.mark.timeout(90)
def test_slow_http_readers_keep_a_werkzeug_servers_memory_bounded(tmp_path: Path) -> None:
    """Three clients reading a 20 MB stream slowly from a real werkzeug server: the
    server's RSS grows by a few MB, not by the text the backend could have produced."""
    (tmp_path / "bigapp.py").write_text(APP)
    port = free_port()
    import os

    env = {
        "MAX_UNREAD": "65536",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    args = [FLASK_BIN, "--app", "bigapp:app", "run", "--port", "{port}", "--no-reload"]
    with (
        run_server(args, port=port, env=env, cwd=tmp_path) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        client.get("/rss")  # warm the app up before measuring
        before = json.loads(client.get("/rss").text)["rss"]
        with contextlib.ExitStack() as stack:
            responses = [stack.enter_context(client.stream("GET", "/big")) for _ in range(3)]
            readers = [r.iter_bytes(4096) for r in responses]
            deadline = time.monotonic() + 2.0
            read = 0
            while time.monotonic() < deadline:  # ~20 KB/s per client
                for reader in readers:
                    read += len(next(reader))
                time.sleep(0.2)
            during = json.loads(client.get("/rss").text)["rss"]
    assert read > 0
    grown = during - before
    assert grown < 25 * 2**20, f"RSS grew {grown / 2**20:.1f} MB"


def test_a_paused_job_is_cancelled_like_any_other() -> None:
    """Closing a stream whose job is paused frees its text, its slot and its id."""
    gen = SimulatedGenerator(step_time=0.0005, tokens_per_step=4)
    with step_engine(gen, max_unread=100) as engine:
        stream = engine.submit("stalled", max_new_tokens=1_000, request_id="p-1")
        assert wait_until(lambda: gen.paused == 1)
        stream.close()
        assert wait_until(lambda: "p-1" in gen.cancelled and engine.in_flight == 0)
        assert gen.paused == 0
        assert stream.channel._unread == 0
        again = engine.submit("again", request_id="p-1", max_new_tokens=3)
        assert again.id == "p-1"
        assert again.result(timeout=10).text == gen.expected_text("again", 3)
    assert (engine.stats.cancelled, engine.stats.completed) == (1, 1)


@pytest.mark.parametrize("option", ["max_unread", "max_output"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_bounds_must_be_positive_ints_or_none(option: str, value: object) -> None:
    """A bad max_unread or max_output fails at construction."""
    with pytest.raises(ValueError, match=option):
        Engine(str.upper, **{option: value})  # type: ignore[arg-type]
