"""The job contract: JobQueue owns take / cancel / drop / expire and the counters; unique
request ids; backend errors logged once with the request id."""

from __future__ import annotations

import logging
import random
import threading

import pytest

from llmbridge import BackendError, Cancelled, Engine, EngineClosed, EngineStats, Overloaded
from llmbridge.backends import Backend, Job, JobQueue, StepBackend
from llmbridge.policies import BatchBackend
from llmbridge.testing import SimulatedGenerator, simulated_engine

from support import wait_until

pytestmark = pytest.mark.timeout(60)


def queue() -> tuple[JobQueue, list[str]]:
    events: list[str] = []
    jobs = JobQueue(
        EngineStats(),
        on_left_queue=lambda job: events.append("left"),
        on_ended=lambda job: events.append(f"ended {job.id}"),
    )
    return jobs, events


def job_for(jobs: JobQueue, request_id: str) -> Job:
    from llmbridge._core.channel import Channel, Request

    request = Request(request_id, "p")
    channel = Channel(request)
    job = Job(jobs, request, channel)
    channel.set_on_cancel(lambda: jobs.cancel(job))
    jobs.put(job)
    return job


def test_a_job_cancelled_before_it_started_is_dropped_by_the_queue() -> None:
    """The queue drops a job whose consumer left while it waited: it leaves the
    admission count once, ends once (cancelled) and never reaches the driver's stop list;
    ``handle`` stays the backend's."""
    jobs, events = queue()
    a = job_for(jobs, "a")
    a.handle = "backend's own"
    new, stop = jobs.take()
    assert new == [a]
    a.channel.cancel()
    new, stop = jobs.take()
    assert (new, stop) == ([], [])
    assert a.dropped
    assert a.ended
    assert not a.started
    assert a.handle == "backend's own"
    assert events == ["left", "ended a"]
    jobs.drop(a)  # idempotent: a driver skipping it later changes nothing
    assert events == ["left", "ended a"]
    assert jobs.stats.as_dict() | {"steps": 0} == {
        "submitted": 1,
        "completed": 0,
        "failed": 0,
        "cancelled": 1,
        "rejected": 0,
        "steps": 0,
    }


def test_a_started_job_cancelled_is_handed_to_the_driver_to_stop() -> None:
    """A started job whose consumer left is counted cancelled once and returned to stop."""
    jobs, events = queue()
    a = job_for(jobs, "a")
    jobs.take()
    a.start()
    a.channel.cancel()
    assert jobs.take() == ([], [a])
    a.finish()  # a late finish from the backend is a no-op
    assert events == ["left", "ended a"]
    assert (jobs.stats.cancelled, jobs.stats.completed) == (1, 0)


def test_expire_fails_started_jobs_and_drops_waiting_ones() -> None:
    """expire() ends every live job: started ones fail, waiting ones leave the queue."""
    jobs, events = queue()
    a, b = job_for(jobs, "a"), job_for(jobs, "b")
    jobs.take()
    a.start()
    jobs.expire(EngineClosed("closing"))
    for job in (a, b):
        with pytest.raises(EngineClosed):
            job.channel.completion()
    assert b.dropped
    assert jobs.in_flight == 0
    assert events.count("left") == 2
    assert jobs.stats.failed == 2


def test_engine_and_drivers_do_not_import_each_other() -> None:
    """The drivers and the batcher import the job contract, never the engine module."""
    import ast
    from pathlib import Path

    root = Path(__file__).parent.parent / "llmbridge"
    for path in (root / "_core" / "drivers.py", root / "_backends" / "batching.py"):
        tree = ast.parse(path.read_text())
        imported = {
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        }
        assert not any(name.endswith("engine") for name in imported), (path, imported)


class MinimalBackend:
    """A third-party backend written against the public contract only."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    def serve(self, jobs: JobQueue) -> None:
        waiting: list[Job] = []
        while True:
            new, stop = jobs.take()
            waiting.extend(new)
            self.stopped.extend(job.id for job in stop)
            for job in waiting:
                if job.ended:
                    jobs.drop(job)
                    continue
                job.start()
                job.emit(job.request.prompt.upper())
                job.finish()
            waiting.clear()
            jobs.flush()
            if jobs.closing:
                return
            jobs.wait()


def test_a_backend_needs_only_take_start_emit_finish() -> None:
    """A Backend using only the public JobQueue API serves an engine."""
    backend = MinimalBackend()
    assert isinstance(backend, Backend)
    with Engine(backend) as engine:
        assert engine.submit("abc").result(timeout=10).text == "ABC"
    assert engine.stats.submitted == engine.stats.completed == 1


# -- unique ids --------------------------------------------------------------------


def test_two_live_requests_with_one_id_get_distinct_ids_and_their_own_text() -> None:
    """A client sending the same X-Request-Id twice at once never mixes streams: the
    second live request gets "<id>.2", and each stream is exactly its own prompt's text."""
    with simulated_engine(step_time=0.001, max_new_tokens=12) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        seen: list[str] = []
        make_job = gen.make_job
        engine.backend.make_job = lambda request: seen.append(request.id) or make_job(request)
        a = engine.submit("first prompt", request_id="abc")
        b = engine.submit("second prompt", request_id="abc")
        assert (a.id, b.id) == ("abc", "abc.2")
        assert a.result(timeout=10).text == gen.expected_text("first prompt", 12)
        assert b.result(timeout=10).text == gen.expected_text("second prompt", 12)
        assert sorted(seen) == ["abc", "abc.2"]
        assert gen.concurrent_entries == 0
        # Once both ended, the id is free again.
        assert wait_until(lambda: engine.in_flight == 0)
        assert engine.submit("third", request_id="abc").id == "abc"


def test_ids_stay_unique_among_many_concurrent_duplicates() -> None:
    """Twenty threads submitting one id at once: twenty distinct ids, exact texts."""
    with simulated_engine(step_time=0.001, max_new_tokens=6) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        barrier = threading.Barrier(20)
        results: dict[str, str] = {}
        prompts: dict[str, str] = {}

        def one(n: int) -> None:
            barrier.wait(10)
            stream = engine.submit(f"prompt {n}", request_id="same")
            prompts[stream.id] = f"prompt {n}"
            results[stream.id] = stream.result(timeout=20).text

        threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 20
        for request_id, text in results.items():
            assert text == gen.expected_text(prompts[request_id], 6)


# -- counters ----------------------------------------------------------------------


def test_every_submitted_request_ends_in_exactly_one_counter() -> None:
    """A storm of random cancels (queued and running), failures and max_queued refusals:
    once quiet, submitted == completed + failed + cancelled, and Prometheus says so too."""
    from prometheus_client import CollectorRegistry

    from llmbridge.metrics import LLMBridgeCollector

    rng = random.Random(7)
    engine = simulated_engine(step_time=0.0005, max_new_tokens=20, max_batch_size=8, max_queued=40)
    refused = 0
    lock = threading.Lock()

    def storm(seed: int) -> None:
        nonlocal refused
        r = random.Random(seed)
        for burst in range(4):
            streams = []
            for n in range(15):  # a burst: more than max_queued across the threads
                params = {"error_after": 3} if r.random() < 0.1 else {}
                try:
                    streams.append(engine.submit(f"storm {seed}-{burst}-{n}", **params))
                except Overloaded:
                    with lock:
                        refused += 1
            for stream in streams:
                action = r.random()
                try:
                    if action < 0.3:
                        stream.cancel()  # most likely still queued
                    elif action < 0.6:
                        next(iter(stream))
                        stream.cancel()  # running
                    else:
                        stream.result(timeout=20)
                except (Cancelled, BackendError, StopIteration):
                    pass

    threads = [threading.Thread(target=storm, args=(rng.randrange(1 << 30),)) for _ in range(8)]
    with engine:
        for t in threads:
            t.start()
        for t in threads:
            t.join(50)
        assert wait_until(lambda: engine.queued == 0 and engine.in_flight == 0)
        stats = engine.stats
        assert wait_until(
            lambda: stats.submitted == stats.completed + stats.failed + stats.cancelled
        ), stats.as_dict()
        assert stats.cancelled > 0
        assert stats.failed > 0
        assert stats.completed > 0
        assert stats.rejected == refused > 0
        assert stats.submitted + refused == 8 * 60
        registry = CollectorRegistry()
        registry.register(LLMBridgeCollector(engine, name="storm"))

        def value(metric: str) -> float | None:
            return registry.get_sample_value(metric, {"engine": "storm"})

        assert value("llmbridge_requests_submitted_total") == stats.submitted
        ended = sum(
            value(f"llmbridge_requests_{state}_total") or 0
            for state in ("completed", "failed", "cancelled")
        )
        assert ended == stats.submitted
        assert value("llmbridge_requests_rejected_total") == refused


# -- errors are logged once, with the request id ------------------------------------


def test_a_backend_exception_is_logged_once_with_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The callable's exception is logged once, where it is wrapped, naming the request;
    the client-facing message reveals nothing of it."""

    def broken(prompt: str) -> str:
        raise RuntimeError("postgres://admin:hunter2@db")

    with caplog.at_level(logging.ERROR, logger="llmbridge"), Engine(broken) as engine:
        stream = engine.submit("x", request_id="rid-7")
        with pytest.raises(BackendError) as info:
            stream.result(timeout=10)
    records = [r for r in caplog.records if "hunter2" in str(r.exc_info and r.exc_info[1])]
    assert len(records) == 1
    assert "rid-7" in records[0].getMessage()
    assert "hunter2" not in info.value.public_message


def test_a_generator_result_error_is_logged_once_with_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A step generator failing one job: one log record naming that job's request."""
    with (
        caplog.at_level(logging.ERROR, logger="llmbridge"),
        simulated_engine(step_time=0.001) as engine,
    ):
        stream = engine.submit("x", request_id="rid-8", error_after=2)
        with pytest.raises(BackendError):
            stream.result(timeout=10)
    records = [
        r for r in caplog.records if r.exc_info and "simulated failure" in str(r.exc_info[1])
    ]
    assert len(records) == 1
    assert "rid-8" in records[0].getMessage()


def test_a_batch_failure_is_logged_once_naming_every_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch function raising fails its batch and is logged once with all the ids."""
    started = threading.Event()
    release = threading.Event()

    def fn(requests: list[object]) -> list[str]:
        started.set()
        release.wait(10)
        raise ValueError("batch secret")

    with (
        caplog.at_level(logging.ERROR, logger="llmbridge"),
        Engine(BatchBackend(fn, max_batch_size=4)) as engine,
    ):
        first = engine.submit("a", request_id="b-1")
        assert started.wait(10)
        second = engine.submit("b", request_id="b-2")
        third = engine.submit("c", request_id="b-3")
        release.set()
        for stream in (first, second, third):
            with pytest.raises(BackendError):
                stream.result(timeout=10)
    records = [r for r in caplog.records if r.exc_info and "batch secret" in str(r.exc_info[1])]
    assert len(records) == 2  # two batches: [b-1] and [b-2, b-3]
    assert "b-1" in records[0].getMessage()
    assert "b-2" in records[1].getMessage()
    assert "b-3" in records[1].getMessage()


def test_step_backend_still_exposes_the_job_contract() -> None:
    """StepBackend keeps its public shape after the refactor."""
    gen = SimulatedGenerator()
    backend = StepBackend(gen, gen.make_job, max_batch_size=2)
    assert isinstance(backend, Backend)


def test_a_backend_crash_is_logged_once_with_the_requests_it_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """serve() itself dying: one log record naming every request it failed."""

    class Crashing:
        def serve(self, jobs: JobQueue) -> None:
            while not jobs.take()[0]:
                jobs.wait()
            raise RuntimeError("driver bug with a secret")

    with caplog.at_level(logging.ERROR, logger="llmbridge"):
        engine = Engine(Crashing())
        try:
            stream = engine.submit("x", request_id="crash-1")
            with pytest.raises(BackendError) as info:
                stream.result(timeout=10)
        finally:
            engine.close()
    records = [r for r in caplog.records if r.exc_info and "driver bug" in str(r.exc_info[1])]
    assert len(records) == 1
    assert "crash-1" in records[0].getMessage()
    assert "secret" not in info.value.public_message
