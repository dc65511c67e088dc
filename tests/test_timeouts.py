"""Timeouts: queue wait, time to first token and total each cancel the backend job."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from llmbridge import Engine, Timeout
from llmbridge._policies.timeouts import Deadlines
from llmbridge.policies import Pipeline, Timeouts
from llmbridge.testing import simulated_engine

from support import wait_until

pytestmark = pytest.mark.timeout(30)


def test_queue_timeout_refuses_a_request_that_never_got_a_slot() -> None:
    """With the only slot busy, a request times out in the queue and never reaches the
    backend; the busy one is unaffected."""
    engine = simulated_engine(step_time=0.005, max_new_tokens=10_000, max_batch_size=1)
    generator = engine.backend.generator
    with (
        Pipeline(engine, timeouts=Timeouts(queue=0.1)) as pipeline,
        pipeline.submit("busy") as busy,
    ):
        busy.wait_started(10)
        waiting = pipeline.submit("waiting")
        with pytest.raises(Timeout, match="backend slot"):
            waiting.wait_started(10)
        assert generator.enqueued == 1
        assert not busy.done
    assert pipeline.stats.timeouts == 1


def test_first_token_timeout_cancels_the_backend_call() -> None:
    """A backend silent past first_token: the consumer gets Timeout (504) and the
    backend's coroutine is cancelled."""
    cancelled = threading.Event()

    async def silent(prompt: str) -> AsyncIterator[str]:
        try:
            await asyncio.sleep(60)
            yield "never"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with Pipeline(Engine(silent), timeouts=Timeouts(first_token=0.1)) as pipeline:
        stream = pipeline.submit("p")
        with pytest.raises(Timeout, match="first token") as info:
            stream.wait_started(10)
        assert info.value.status == 504
        assert cancelled.wait(10)


def test_total_timeout_ends_a_stream_midway_and_cancels_the_job() -> None:
    """A long generation past ``total``: text so far, then Timeout; the job is dropped."""
    engine = simulated_engine(step_time=0.005, max_new_tokens=100_000)
    generator = engine.backend.generator
    with Pipeline(engine, timeouts=Timeouts(total=0.3)) as pipeline:
        chunks = iter(pipeline.submit("long", seed=2))
        text = next(chunks)
        with pytest.raises(Timeout, match="total timeout"):
            text += "".join(chunks)
        assert text  # it did stream before the deadline
        assert generator.expected_text("long", 100_000, seed=2).startswith(text)
        assert wait_until(lambda: len(generator.cancelled) == 1)
        assert generator.jobs_in_flight == 0


def test_per_call_timeouts_override_the_pipeline() -> None:
    """``policy={"timeouts": {...}}`` replaces the pipeline's deadlines for one call."""
    engine = simulated_engine(step_time=0.005, max_new_tokens=100_000)
    with Pipeline(engine, timeouts=Timeouts(total=60)) as pipeline:
        stream = pipeline.submit("long", policy={"timeouts": {"total": 0.1}})
        with pytest.raises(Timeout):
            stream.result(10)


def test_fast_requests_are_untouched() -> None:
    """Requests well within their deadlines complete normally."""
    engine = simulated_engine(step_time=0.001, max_new_tokens=8)
    generator = engine.backend.generator
    timeouts = Timeouts(queue=10, first_token=10, total=20)
    with Pipeline(engine, timeouts=timeouts) as pipeline:
        streams = [pipeline.submit(f"p{i}") for i in range(20)]
        for i, s in enumerate(streams):
            assert s.result(10).text == generator.expected_text(f"p{i}")
    assert generator.cancelled == []


def test_deadline_arithmetic() -> None:
    """Which deadline applies depends on whether the job started and text arrived."""
    deadlines = Deadlines(Timeouts(queue=1, first_token=5, total=10), start=100.0)
    deadlines.attempt_started(100.0)
    assert deadlines.wait_for(started=False, has_text=False, now=100.0) == 1
    assert deadlines.wait_for(started=True, has_text=False, now=100.0) == 5
    assert deadlines.wait_for(started=True, has_text=True, now=100.0) == 10
    assert deadlines.passed(started=False, has_text=False, now=101.0) is not None
    assert deadlines.passed(started=True, has_text=False, now=101.0) is None
    assert "first token" in str(deadlines.passed(started=True, has_text=False, now=105.0))
    assert "total" in str(deadlines.passed(started=True, has_text=True, now=110.0))
    assert Deadlines(Timeouts(), 0.0).wait_for(started=False, has_text=False) is None
    assert Deadlines(Timeouts(), 0.0).end is None


@pytest.mark.parametrize(
    "kwargs", [{"queue": 0}, {"first_token": -1}, {"total": "5"}, {"total": True}]
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, object]) -> None:
    """Non-positive or non-numeric timeouts raise ValueError naming the field."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Timeouts(**kwargs)  # type: ignore[arg-type]
