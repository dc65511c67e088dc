"""Single-flight: identical requests in flight share one backend job, every reader gets
all of it, and the job is cancelled only when nobody is left reading."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import anyio
import pytest

from llmbridge import Cancelled, Engine, Request, Stream, UpstreamError
from llmbridge._core.stream import Channel, Completion
from llmbridge._policies.singleflight import Flight
from llmbridge.policies import Pipeline
from llmbridge.testing import simulated_engine

from support import wait_until

pytestmark = pytest.mark.timeout(60)

TOKENS = [f" t{i}" for i in range(20)]
TEXT = "".join(TOKENS)


class GatedBackend:
    """A sync generator backend that yields half its tokens, then waits for ``middle``,
    then waits for ``end`` before finishing; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.start = threading.Event()
        self.middle = threading.Event()
        self.end = threading.Event()
        self.half_out = threading.Event()
        self.finished = threading.Event()

    def __call__(self, prompt: str, **params: object) -> Iterator[str]:
        with self.lock:
            self.calls += 1
        assert self.start.wait(20)
        yield from TOKENS[:10]
        self.half_out.set()
        assert self.middle.wait(20)
        yield from TOKENS[10:]
        assert self.end.wait(20)
        self.finished.set()

    def open_all(self) -> None:
        self.start.set()
        self.middle.set()
        self.end.set()


@pytest.fixture
def gated() -> Iterator[tuple[Pipeline, GatedBackend]]:
    backend = GatedBackend()
    pipeline = Pipeline(Engine(backend), single_flight=True)
    try:
        yield pipeline, backend
    finally:
        backend.open_all()
        pipeline.close()


def submit_many(pipeline: Pipeline, n: int, prompt: str = "same") -> list[Stream]:
    """Submit ``n`` identical requests from ``n`` threads released at once."""
    barrier = threading.Barrier(n)
    streams: list[Stream | None] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        streams[i] = pipeline.submit(prompt, temperature=0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s is not None for s in streams)
    return streams  # type: ignore[return-value]


def test_hundred_identical_requests_make_one_backend_call(
    gated: tuple[Pipeline, GatedBackend],
) -> None:
    """100 concurrent identical requests: 1 backend call, 100 identical full outputs."""
    pipeline, backend = gated
    streams = submit_many(pipeline, 100)
    assert wait_until(lambda: pipeline.stats.coalesced == 99)
    backend.open_all()
    results = [s.result(20) for s in streams]
    assert backend.calls == 1
    assert pipeline.stats.backend_calls == 1
    assert {r.text for r in results} == {TEXT}
    assert all(r.finish_reason == "stop" for r in results)
    assert len({r.id for r in results}) == 100  # each reader has its own request


def test_random_follower_cancellations_leave_the_rest_complete(
    gated: tuple[Pipeline, GatedBackend],
) -> None:
    """Cancelling a random 40 readers mid-stream (the first included) leaves the other
    60 with the whole text, from the one backend job."""
    pipeline, backend = gated
    streams = submit_many(pipeline, 100)
    assert wait_until(lambda: pipeline.stats.coalesced == 99)
    backend.start.set()
    assert backend.half_out.wait(10)
    rng = random.Random(5)
    doomed = set(rng.sample(range(100), 40)) | {0}
    for i in doomed:
        streams[i].cancel()
    backend.middle.set()
    backend.end.set()
    for i, stream in enumerate(streams):
        if i in doomed:
            with pytest.raises(Cancelled):
                stream.result(10)
        else:
            assert stream.result(10).text == TEXT
    assert backend.calls == 1
    assert backend.finished.is_set()  # the shared job ran to its end


def test_late_joiner_gets_the_text_so_far_then_the_rest(
    gated: tuple[Pipeline, GatedBackend],
) -> None:
    """A request joining after half the text was produced still reads all of it."""
    pipeline, backend = gated
    first = pipeline.submit("same", temperature=0)
    backend.start.set()
    assert backend.half_out.wait(10)
    reader = iter(first)
    seen = ""
    while len(seen) < len("".join(TOKENS[:10])):
        seen += next(reader)
    late = pipeline.submit("same", temperature=0)
    chunks = iter(late)
    assert next(chunks) == "".join(TOKENS[:10])  # the replay arrives in one piece
    backend.middle.set()
    backend.end.set()
    assert next(chunks) + "".join(chunks) == "".join(TOKENS[10:])
    assert seen + "".join(reader) == TEXT
    assert backend.calls == 1
    assert pipeline.stats.coalesced == 1


def test_backend_job_is_cancelled_only_when_the_last_reader_leaves() -> None:
    """Readers leaving one by one: the job runs while any is left, stops after the last."""
    engine = simulated_engine(step_time=0.01, max_new_tokens=500)
    generator = engine.backend.generator
    with Pipeline(engine, single_flight=True) as pipeline:
        streams = [pipeline.submit("long", seed=1) for _ in range(5)]
        for s in streams:
            s.wait_started(10)
        for s in streams[:-1]:
            s.cancel()
        steps = generator.steps
        assert wait_until(lambda: generator.steps >= steps + 3)
        assert generator.cancelled == []  # one reader left: still running
        streams[-1].close()
        assert wait_until(lambda: len(generator.cancelled) == 1)
        assert generator.jobs_in_flight == 0
        assert generator.steps < 400  # stopped long before its natural end


def test_dropping_every_reader_cancels_the_job() -> None:
    """Readers that are garbage-collected unread count as leaving."""
    engine = simulated_engine(step_time=0.01, max_new_tokens=500)
    generator = engine.backend.generator
    with Pipeline(engine, single_flight=True) as pipeline:
        streams = [pipeline.submit("long", seed=1) for _ in range(3)]
        streams[0].wait_started(10)
        del streams
        assert wait_until(lambda: len(generator.cancelled) == 1)


def test_a_new_request_after_everyone_left_starts_a_new_job() -> None:
    """Once a flight was abandoned, the next identical request is not attached to it."""
    engine = simulated_engine(step_time=0.002, max_new_tokens=30)
    generator = engine.backend.generator
    with Pipeline(engine, single_flight=True) as pipeline:
        first = pipeline.submit("p", seed=3)
        first.wait_started(10)
        first.cancel()
        assert wait_until(lambda: len(generator.cancelled) == 1)
        again = pipeline.submit("p", seed=3).result(10)
        assert again.text == generator.expected_text("p", seed=3)
        assert generator.enqueued == 2


def test_failure_before_text_reaches_every_reader() -> None:
    """A backend error ends every reader of the flight with that error."""
    gate = threading.Event()
    calls: list[str] = []

    def failing(prompt: str, **params: object) -> str:
        calls.append(prompt)
        gate.wait(10)
        raise UpstreamError("upstream said no", upstream_status=500)

    with Pipeline(Engine(failing), single_flight=True) as pipeline:
        streams = [pipeline.submit("p", temperature=0) for _ in range(10)]
        assert wait_until(lambda: pipeline.stats.coalesced == 9)
        gate.set()
        for s in streams:
            with pytest.raises(UpstreamError, match="upstream said no"):
                s.wait_started(10)
    assert calls == ["p"]


def test_only_deterministic_identical_requests_share() -> None:
    """Sampling requests, other namespaces and opted-out calls each get their own job."""
    engine = simulated_engine(step_time=0.005, max_new_tokens=20)
    generator = engine.backend.generator
    with Pipeline(engine, single_flight=True) as pipeline:
        streams = [
            pipeline.submit("p", temperature=0.8),
            pipeline.submit("p", temperature=0.8),
            pipeline.submit("p", temperature=0, policy={"namespace": "a"}),
            pipeline.submit("p", temperature=0, policy={"namespace": "b"}),
            pipeline.submit("p", temperature=0, policy={"single_flight": False}),
            pipeline.submit("p", temperature=0, policy={"single_flight": False}),
        ]
        for s in streams:
            s.result(10)
    assert generator.enqueued == 6
    assert pipeline.stats.coalesced == 0


@pytest.mark.anyio
async def test_async_readers_share_one_job() -> None:
    """100 coroutines reading the same prompt with async for get the same full text."""
    engine = simulated_engine(step_time=0.003, max_new_tokens=40)
    generator = engine.backend.generator
    expected = generator.expected_text("shared", seed=9)
    async with Pipeline(engine, single_flight=True) as pipeline:
        texts: list[str] = []

        async def read() -> None:
            stream = pipeline.submit("shared", seed=9)
            text = ""
            async for chunk in stream:
                text += chunk
            texts.append(text)

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(read)
    assert texts == [expected] * 100
    assert generator.enqueued < 100  # shared (the first may finish before the last joins)
    assert pipeline.stats.coalesced == 100 - generator.enqueued


@pytest.mark.slow
def test_stress_mixed_prompts_cancellations_and_threads() -> None:
    """Many rounds of threads over a few prompts, a third cancelled at random points:
    every surviving stream gets exactly its own prompt's text, and nothing hangs."""
    engine = simulated_engine(step_time=0.0005, max_new_tokens=24, tokens_per_step=2)
    generator = engine.backend.generator
    prompts = [f"prompt-{i}" for i in range(6)]
    expected = {p: generator.expected_text(p, seed=1) for p in prompts}
    errors: list[str] = []
    with Pipeline(engine, single_flight=True) as pipeline:
        for round_ in range(40):
            rng = random.Random(round_)

            def worker(i: int, rng_seed: int) -> None:
                local = random.Random(rng_seed)
                prompt = prompts[local.randrange(len(prompts))]
                stream = pipeline.submit(prompt, seed=1)
                if local.random() < 0.33:
                    text = ""
                    for chunk in stream:
                        text += chunk
                        if local.random() < 0.5:
                            break
                    stream.close()
                    if not expected[prompt].startswith(text):
                        errors.append(f"{prompt}: prefix {text!r}")
                    return
                got = "".join(stream)
                if got != expected[prompt]:
                    errors.append(f"{prompt}: {got!r}")

            threads = [
                threading.Thread(target=worker, args=(i, rng.randrange(1 << 30))) for i in range(40)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
                assert not t.is_alive()
        assert errors == []
        assert wait_until(lambda: generator.jobs_in_flight == 0)
    assert generator.concurrent_entries == 0
    assert pipeline.stats.coalesced > 0


def test_flight_joined_after_finish_replays_everything() -> None:
    """A channel joining a finished flight gets all text and the finish at once."""
    flight = Flight("k")
    early = Channel(Request("a", "p"))
    flight.join(early)
    flight.emit("he")
    flight.emit("llo")
    flight.finish(Completion("x", "hello", "length", 3, 2, 0.0, 0.0, 0.0))
    late = Channel(Request("b", "p"))
    flight.join(late)
    for channel in (early, late):
        completion = channel.completion()
        assert (completion.text, completion.finish_reason) == ("hello", "length")
        assert (completion.prompt_tokens, completion.completion_tokens) == (3, 2)
    assert flight.joined == 2
