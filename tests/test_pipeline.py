"""A Pipeline request is the engine's request: one id, one channel, one copy of its text."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from llmbridge import Engine, Overloaded, Request, Timeout
from llmbridge._core import channel as channel_module
from llmbridge.policies import Pipeline, RateLimit, Retry, Timeouts
from llmbridge.testing import SimulatedGenerator, simulated_engine

from support import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def channels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The request id of every Channel built while the test runs."""
    built: list[str] = []
    original = channel_module.Channel.__init__

    def spy(self: Any, request: Request, *args: Any, **kwargs: Any) -> None:
        built.append(request.id)
        original(self, request, *args, **kwargs)

    monkeypatch.setattr(channel_module.Channel, "__init__", spy)
    return built


def recording(engine: Engine) -> list[str]:
    """The ids the step generator's jobs were made with."""
    seen: list[str] = []
    backend: Any = engine.backend
    make_job = backend.make_job

    def record(request: Request) -> Any:
        seen.append(request.id)
        return make_job(request)

    backend.make_job = record
    return seen


def test_a_sync_callable_streams_through_one_channel_per_request(channels: list[str]) -> None:
    """Pipeline over a sync callable, with retries, timeouts and a rate limit: each
    request builds exactly one channel (the engine's), and streams its chunks in order."""

    def chunks(prompt: str) -> Iterator[str]:
        yield from prompt.split()

    pipeline = Pipeline(
        Engine(chunks),
        retry=Retry(attempts=3, initial=0.001),
        timeouts=Timeouts(total=20),
        rate_limit=RateLimit(requests_per_minute=1000),
    )
    with pipeline:
        stream = pipeline.submit("one two three", request_id="client-9")
        received = list(stream)
    assert "".join(received) == "onetwothree"
    assert channels == ["client-9"]
    assert stream.id == "client-9"


def test_the_id_given_to_the_pipeline_is_the_backend_jobs(channels: list[str]) -> None:
    """request_id reaches the step generator's job unchanged; the engine's and the
    stream's ids are the same, and one channel carried the text."""
    engine = simulated_engine(step_time=0.001, max_new_tokens=6)
    seen = recording(engine)
    gen: SimulatedGenerator = engine.backend.generator
    with Pipeline(engine, retry=2, timeouts=Timeouts(total=20)) as pipeline:
        stream = pipeline.submit("hello", request_id="x-req-1")
        assert stream.result(timeout=10).text == gen.expected_text("hello", 6)
    assert (stream.id, seen, channels) == ("x-req-1", ["x-req-1"], ["x-req-1"])


def test_two_pipeline_requests_with_one_id_never_mix() -> None:
    """The same client id twice at once through a pipeline: distinct ids, exact texts."""
    engine = simulated_engine(step_time=0.001, max_new_tokens=10)
    seen = recording(engine)
    gen: SimulatedGenerator = engine.backend.generator
    with Pipeline(engine, timeouts=Timeouts(total=20)) as pipeline:
        a = pipeline.submit("first", request_id="dup")
        b = pipeline.submit("second", request_id="dup")
        assert (a.id, b.id) == ("dup", "dup.2")
        assert a.result(timeout=10).text == gen.expected_text("first", 10)
        assert b.result(timeout=10).text == gen.expected_text("second", 10)
    assert sorted(seen) == ["dup", "dup.2"]


def test_a_retry_before_the_first_token_is_a_new_job_into_the_same_channel(
    channels: list[str],
) -> None:
    """An attempt refused before any text is retried as a new engine job writing into
    the caller's channel: the caller sees one clean answer, the engine two jobs."""
    calls = 0

    def flaky(prompt: str) -> Iterator[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Overloaded("busy upstream", retry_after=0.0)
        yield "fine "
        yield "answer"

    engine = Engine(flaky)
    with Pipeline(engine, retry=Retry(attempts=3, initial=0.001)) as pipeline:
        stream = pipeline.submit("q", request_id="r-1")
        assert stream.result(timeout=10).text == "fine answer"
        assert wait_until(lambda: engine.in_flight == 0)
    assert pipeline.stats.retries == 1
    assert pipeline.stats.backend_calls == 2
    stats = engine.stats
    assert (stats.submitted, stats.failed, stats.completed) == (2, 1, 1)
    assert channels == ["r-1"]


def test_a_first_token_timeout_cancels_the_direct_job() -> None:
    """A deadline on the direct path cancels the backend job and fails the stream."""
    engine = simulated_engine(step_time=0.001, max_new_tokens=4)
    gen: SimulatedGenerator = engine.backend.generator
    blocker = threading.Event()
    original = gen.make_job

    def slow_start(request: Request) -> Any:
        blocker.wait(5)  # the engine thread is stuck: no first token in time
        return original(request)

    engine.backend.make_job = slow_start  # type: ignore[attr-defined]
    with Pipeline(engine, timeouts=Timeouts(first_token=0.05)) as pipeline:
        stream = pipeline.submit("late", request_id="t-1")
        with pytest.raises(Timeout):
            stream.result(timeout=10)
        blocker.set()
        assert wait_until(lambda: engine.in_flight == 0 and engine.queued == 0)
    assert engine.stats.cancelled == 1
    assert pipeline.stats.timeouts == 1


def test_cancelling_a_direct_request_stops_its_backend_job() -> None:
    """Closing the pipeline's stream reaches the step generator within a step."""
    engine = simulated_engine(step_time=0.002, max_new_tokens=10_000)
    gen: SimulatedGenerator = engine.backend.generator
    with Pipeline(engine, retry=2) as pipeline:
        stream = pipeline.submit("long", request_id="c-1")
        next(iter(stream))
        stream.close()
        assert wait_until(lambda: "c-1" in gen.cancelled)
        assert wait_until(lambda: engine.in_flight == 0)
    assert engine.stats.cancelled == 1


def test_single_flight_followers_keep_their_ids_and_the_job_carries_the_leaders() -> None:
    """Shared flights: the one backend job runs under the leader's id; every follower's
    stream has its own id and the same exact text."""
    engine = simulated_engine(step_time=0.002, max_new_tokens=20)
    seen = recording(engine)
    gen: SimulatedGenerator = engine.backend.generator
    with Pipeline(engine, single_flight=True) as pipeline:
        leader = pipeline.submit("shared", temperature=0, request_id="lead")
        reader = iter(leader)
        first = next(reader)
        followers = [
            pipeline.submit("shared", temperature=0, request_id=f"f-{n}") for n in range(3)
        ]
        texts = {s.id: s.result(timeout=10).text for s in followers}
        texts["lead"] = first + "".join(reader)
    assert seen == ["lead"]
    assert sorted(texts) == ["f-0", "f-1", "f-2", "lead"]
    assert set(texts.values()) == {gen.expected_text("shared", 20)}
