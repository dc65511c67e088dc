"""The engine: admission, single ownership, cancellation, errors, close, fork."""

from __future__ import annotations

import gc
import os
import threading

import pytest

from llmbridge import (
    BackendError,
    BadRequest,
    Cancelled,
    Engine,
    EngineClosed,
    Overloaded,
)
from llmbridge.backends import StepBackend
from llmbridge.testing import SimulatedGenerator, simulated_engine

from support import wait_until

pytestmark = pytest.mark.timeout(30)


def make(step_time: float = 0.001, max_new_tokens: int = 8, **kw: object) -> Engine:
    return simulated_engine(step_time=step_time, max_new_tokens=max_new_tokens, **kw)  # type: ignore[no-any-return]


def test_result_is_the_generators_exact_text() -> None:
    """A submitted request's completion is exactly the text its job produced."""
    with make() as engine:
        gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
        completion = engine.submit("hello world", max_new_tokens=5).result(timeout=10)
    assert completion.text == gen.expected_text("hello world", 5)
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 5
    assert completion.prompt_tokens == 2
    assert completion.total_tokens == 7
    assert 0 <= completion.queued <= completion.total
    assert completion.time_to_first_token is not None
    assert completion.queued <= completion.time_to_first_token <= completion.total


def test_engine_starts_lazily_and_close_joins_its_thread() -> None:
    """No thread before first use; close() stops the one thread it started."""
    engine = make()
    assert engine.thread is None
    engine.submit("x").result(timeout=10)
    thread = engine.thread
    assert thread is not None
    assert thread.is_alive()
    engine.close()
    assert not thread.is_alive()
    assert not engine.running


def test_only_the_engine_thread_touches_the_generator() -> None:
    """Requests from many threads reach the generator from one thread only."""
    with make() as engine:
        gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
        results: list[str] = []
        lock = threading.Lock()

        def worker(i: int) -> None:
            text = engine.submit(f"prompt {i}").result(timeout=20).text
            with lock:
                results.append(text)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert engine.thread is not None
        assert gen.threads == {engine.thread.ident}
        assert gen.concurrent_entries == 0
        assert sorted(results) == sorted(gen.expected_text(f"prompt {i}", 8) for i in range(16))


def test_jobs_are_batched_up_to_max_batch_size() -> None:
    """Many jobs are in the generator at once, never more than max_batch_size."""
    with make(step_time=0.002, max_new_tokens=20, max_batch_size=4) as engine:
        gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
        streams = [engine.submit(f"p{i}") for i in range(12)]
        for s in streams:
            s.result(timeout=20)
        assert gen.max_batch_seen == 4


def test_submit_beyond_max_queued_raises_overloaded_at_once() -> None:
    """With max_queued=N, the (N+1)th waiting request is refused immediately."""
    release = threading.Event()

    def slow(prompt: str) -> str:
        release.wait(10)
        return prompt

    from llmbridge.backends import CallableBackend

    engine = Engine(CallableBackend(slow, max_concurrency=1, max_threads=1), max_queued=3)
    try:
        first = engine.submit("running")
        assert wait_until(lambda: engine.queued == 0)  # taken by the backend
        queued = [engine.submit(f"q{i}") for i in range(3)]
        with pytest.raises(Overloaded) as info:
            engine.submit("one too many")
        assert info.value.status == 503
        assert info.value.retry_after is not None
        release.set()
        assert first.result(timeout=10).text == "running"
        assert [s.result(timeout=10).text for s in queued] == ["q0", "q1", "q2"]
        # Room again once the queue drained.
        assert engine.submit("again").result(timeout=10).text == "again"
    finally:
        release.set()
        engine.close()


def test_non_string_prompt_is_a_bad_request() -> None:
    """A prompt that is not a str fails at submit with BadRequest (400)."""
    with make() as engine, pytest.raises(BadRequest):
        engine.submit(b"bytes")  # type: ignore[arg-type]


def test_bad_configuration_fails_at_construction() -> None:
    """Negative or zero sizes and non-backends are refused with a clear message."""
    gen = SimulatedGenerator()
    with pytest.raises(ValueError, match="max_queued"):
        Engine(lambda p: p, max_queued=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        StepBackend(gen, gen.make_job, max_batch_size=-1)
    with pytest.raises(TypeError, match="Backend"):
        Engine(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterate"):
        StepBackend(object(), gen.make_job)  # type: ignore[arg-type]


def test_cancel_reaches_the_generator_within_one_step() -> None:
    """A consumer that stops after 2 chunks has its job dropped within one step."""
    with make(step_time=0.002, max_new_tokens=1000) as engine:
        gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
        stream = engine.submit("long")
        chunks = iter(stream)
        next(chunks)
        next(chunks)
        steps_at_cancel = gen.steps
        chunks.close()  # type: ignore[attr-defined]
        assert wait_until(lambda: stream.id in gen.cancelled)
        # The cancel is taken between steps: at most the step in progress completes.
        assert gen.steps - steps_at_cancel <= 1
        assert gen.jobs_in_flight == 0
        with pytest.raises(Cancelled):
            stream.result(timeout=5)


def test_breaking_out_of_a_for_loop_cancels_the_job() -> None:
    """`break` drops the iterator, which cancels the backend job."""
    with make(step_time=0.002, max_new_tokens=1000) as engine:
        gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
        stream = engine.submit("long")
        for n, _ in enumerate(stream):
            if n == 1:
                break
        assert wait_until(lambda: stream.id in gen.cancelled)
        assert gen.jobs_in_flight == 0


def test_dropping_an_unread_stream_cancels_the_job() -> None:
    """A stream nobody holds any more is cancelled, freeing its batch slot."""
    with make(step_time=0.002, max_new_tokens=1000) as engine:
        gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
        stream = engine.submit("forgotten")
        stream_id = stream.id
        assert wait_until(lambda: gen.jobs_in_flight == 1)
        del stream
        gc.collect()
        assert wait_until(lambda: stream_id in gen.cancelled)
        assert gen.jobs_in_flight == 0


def test_cancel_is_idempotent_and_a_no_op_after_the_end() -> None:
    """cancel() twice, or after completion, changes nothing and returns False."""
    with make() as engine:
        gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
        done = engine.submit("short", max_new_tokens=2)
        text = done.result(timeout=10).text
        assert done.cancel() is False
        assert done.result().text == text
        running = engine.submit("long", max_new_tokens=10_000)
        assert running.cancel() is True
        assert running.cancel() is False
        assert wait_until(lambda: gen.jobs_in_flight == 0)
        assert done.id not in gen.cancelled


def test_cancelling_one_stream_never_touches_another() -> None:
    """Neighbours of a cancelled stream get their full, exact text."""
    with make(step_time=0.001, max_new_tokens=30) as engine:
        gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
        streams = [engine.submit(f"n{i}") for i in range(10)]
        victims = streams[::3]
        for s in victims:
            s.cancel()
        for i, s in enumerate(streams):
            if s in victims:
                with pytest.raises(Cancelled):
                    s.result(timeout=10)
            else:
                assert s.result(timeout=10).text == gen.expected_text(f"n{i}", 30)
        assert wait_until(lambda: gen.jobs_in_flight == 0)
        assert set(gen.cancelled) <= {s.id for s in victims}


def test_a_job_error_fails_only_its_stream() -> None:
    """A per-job error fails that stream with BackendError; the others complete."""
    with make(max_new_tokens=6) as engine:
        gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
        good = [engine.submit(f"g{i}") for i in range(4)]
        bad = engine.submit("bad", error_after=2)
        with pytest.raises(BackendError, match="simulated failure after 2 tokens"):
            bad.result(timeout=10)
        for i, s in enumerate(good):
            assert s.result(timeout=10).text == gen.expected_text(f"g{i}", 6)


def test_make_job_error_fails_only_that_request() -> None:
    """Bad params (make_job raises) fail that request; the engine goes on."""
    with make() as engine:
        bad = engine.submit("x", max_new_tokens=-3)
        with pytest.raises(BackendError, match="max_new_tokens"):
            bad.result(timeout=10)
        assert engine.submit("fine").result(timeout=10).finish_reason == "length"


def test_iterate_crash_fails_in_flight_streams_and_the_engine_recovers() -> None:
    """An exception from iterate() fails the requests in flight; new ones are served."""
    with make(step_time=0.002, max_new_tokens=200) as engine:
        gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
        in_flight = [engine.submit(f"a{i}") for i in range(3)]
        for s in in_flight:
            s.wait_started(timeout=10)
        gen.fail_next_iterate(RuntimeError("CUDA out of memory"))
        for s in in_flight:
            with pytest.raises(BackendError, match="CUDA out of memory"):
                s.result(timeout=10)
        after = engine.submit("after", max_new_tokens=4)
        assert after.result(timeout=10).text == gen.expected_text("after", 4)


def test_serve_crash_fails_everything_and_next_submit_restarts() -> None:
    """If the backend's loop itself dies, pending streams fail and the engine restarts."""
    calls = 0

    class Fragile:
        def serve(self, jobs: object) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                jobs.take()  # type: ignore[attr-defined]
                raise RuntimeError("driver bug")
            StepBackend(gen, gen.make_job).serve(jobs)  # type: ignore[arg-type]

    gen = SimulatedGenerator(step_time=0.0)
    engine = Engine(Fragile())
    try:
        first = engine.submit("one")
        with pytest.raises(BackendError, match="driver bug"):
            first.result(timeout=10)
        assert wait_until(lambda: not engine.running)
        second = engine.submit("two", max_new_tokens=3)
        assert second.result(timeout=10).text == gen.expected_text("two", 3)
    finally:
        engine.close()


def test_close_drains_in_flight_requests() -> None:
    """close() lets running requests finish before stopping."""
    engine = make(step_time=0.001, max_new_tokens=20)
    gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
    streams = [engine.submit(f"d{i}") for i in range(5)]
    engine.close(timeout=30)
    for i, s in enumerate(streams):
        assert s.result(timeout=1).text == gen.expected_text(f"d{i}", 20)
    with pytest.raises(EngineClosed):
        engine.submit("late")


def test_close_deadline_ends_the_rest_with_engine_closed() -> None:
    """Requests still running at the close deadline end with EngineClosed."""
    engine = make(step_time=0.005, max_new_tokens=100_000)
    stream = engine.submit("endless")
    stream.wait_started(timeout=10)
    engine.close(timeout=0.1)
    with pytest.raises(EngineClosed):
        stream.result(timeout=5)
    assert engine.backend.generator.jobs_in_flight == 0  # type: ignore[attr-defined]


def test_close_is_idempotent_and_works_before_start() -> None:
    """close() on a never-used engine, and twice, is fine."""
    engine = make()
    engine.close()
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit("x")


@pytest.mark.anyio
async def test_async_context_manager_closes() -> None:
    """`async with Engine(...)` closes the engine without blocking the loop."""
    async with make() as engine:
        completion = await engine.submit("async").aresult()
        assert completion.completion_tokens == 8
    assert not engine.running


def test_stats_count_what_happened() -> None:
    """Engine.stats counts submitted, completed, failed, cancelled and steps."""
    with make(max_new_tokens=3) as engine:
        engine.submit("a").result(timeout=10)
        bad = engine.submit("b", error_after=1)
        with pytest.raises(BackendError):
            bad.result(timeout=10)
        c = engine.submit("c", max_new_tokens=100_000)
        c.wait_started(timeout=10)
        c.cancel()
        assert wait_until(lambda: engine.stats.cancelled == 1)
        stats = engine.stats.as_dict()
    assert stats["submitted"] == 3
    assert stats["completed"] == 1
    assert stats["failed"] == 1
    assert stats["steps"] >= 3
    assert engine.in_flight == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_fresh_working_engine() -> None:
    """Used in the parent, forked: the child's first submit completes."""
    engine = make(max_new_tokens=4)
    gen: SimulatedGenerator = engine.backend.generator  # type: ignore[attr-defined]
    expected = gen.expected_text("in child", 4)
    engine.submit("in parent").result(timeout=10)
    busy = engine.submit("still running in the parent", max_new_tokens=100_000)
    busy.wait_started(timeout=10)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            text = engine.submit("in child").result(timeout=10).text
            os.write(write_fd, text.encode())
            code = 0 if gen.jobs_in_flight == 0 else 2
        finally:
            os._exit(code)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd, "rb") as pipe:
        child_text = pipe.read().decode()
    busy.cancel()
    engine.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_text == expected


def test_cancelling_queued_step_jobs_frees_admission_slots() -> None:
    """Queued (not yet batched) jobs cancelled by their consumers leave the queue at once."""
    with make(step_time=0.002, max_new_tokens=10_000, max_batch_size=1, max_queued=3) as engine:
        first = engine.submit("running")
        first.wait_started(timeout=10)
        queued = [engine.submit(f"q{i}") for i in range(3)]
        with pytest.raises(Overloaded):
            engine.submit("full")
        for s in queued:
            s.cancel()
        assert wait_until(lambda: engine.queued == 0)
        again = engine.submit("fits again", max_new_tokens=2)
        first.cancel()
        assert again.result(timeout=10).completion_tokens == 2
