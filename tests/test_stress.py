"""Stress: thousands of requests from many threads and event loops through one engine."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import tracemalloc

import pytest

from llmbridge import Overloaded
from llmbridge.testing import SimulatedGenerator, simulated_engine

from support import wait_until

N_THREADS = 64
N_LOOPS = 8
TASKS_PER_LOOP = 64
TOTAL = 10_000


@pytest.mark.timeout(300)
def test_10k_requests_from_64_threads_and_8_loops_are_isolated() -> None:
    """Every stream receives exactly its own text, once, in order; nothing leaks after."""
    threads_before = threading.active_count()
    engine = simulated_engine(
        step_time=0.0002, max_new_tokens=6, max_batch_size=256, max_queued=TOTAL
    )
    gen: SimulatedGenerator = engine.backend.generator
    consumers = N_THREADS + N_LOOPS * TASKS_PER_LOOP
    prompts = [f"stress prompt {i}" for i in range(TOTAL)]
    # Each consumer takes every consumers-th prompt: all 10,000 are submitted once.
    received: dict[str, str] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(N_THREADS + N_LOOPS)

    def thread_consumer(slot: int) -> None:
        barrier.wait()
        try:
            for prompt in prompts[slot::consumers]:
                rng = random.Random(prompt)
                stream = engine.submit(prompt, seed=None)
                if rng.random() < 0.5:
                    text = "".join(stream)  # chunk by chunk
                else:
                    text = stream.result(timeout=60).text
                with lock:
                    assert prompt not in received
                    received[prompt] = text
        except BaseException as exc:
            errors.append(exc)

    def loop_consumer(loop_index: int) -> None:
        async def task(slot: int) -> None:
            for prompt in prompts[slot::consumers]:
                stream = engine.submit(prompt)
                if random.Random(prompt).random() < 0.5:
                    text = "".join([chunk async for chunk in stream])
                else:
                    text = (await stream.aresult()).text
                with lock:
                    assert prompt not in received
                    received[prompt] = text

        async def main() -> None:
            base = N_THREADS + loop_index * TASKS_PER_LOOP
            await asyncio.gather(*(task(base + i) for i in range(TASKS_PER_LOOP)))

        barrier.wait()
        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=thread_consumer, args=(i,)) for i in range(N_THREADS)]
    workers += [threading.Thread(target=loop_consumer, args=(i,)) for i in range(N_LOOPS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(240)
    assert not errors, errors[:3]
    assert len(received) == TOTAL
    for prompt in prompts:
        assert received[prompt] == gen.expected_text(prompt, 6), prompt
    assert gen.concurrent_entries == 0
    assert gen.enqueued == TOTAL
    assert gen.jobs_in_flight == 0
    assert engine.in_flight == 0
    assert engine.queued == 0
    assert engine.stats.completed == TOTAL
    engine.close()
    assert wait_until(lambda: threading.active_count() == threads_before)


@pytest.mark.timeout(120)
def test_random_cancellations_under_load_leave_no_job_behind() -> None:
    """Half the consumers give up at random points; the rest are exact; nothing leaks."""
    engine = simulated_engine(step_time=0.0, max_new_tokens=20, max_batch_size=64)
    gen: SimulatedGenerator = engine.backend.generator
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        rng = random.Random(n)
        try:
            for i in range(40):
                prompt = f"w{n}-{i}"
                stream = engine.submit(prompt)
                if rng.random() < 0.5:
                    stop_after = rng.randrange(0, 4)
                    for k, _ in enumerate(stream):
                        if k >= stop_after:
                            break
                    if rng.random() < 0.5:
                        stream.cancel()
                    else:
                        del stream
                else:
                    assert stream.result(timeout=60).text == gen.expected_text(prompt, 20)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors[:3]
    gc.collect()
    assert wait_until(lambda: gen.jobs_in_flight == 0 and engine.in_flight == 0)
    assert gen.concurrent_entries == 0
    engine.close()


@pytest.mark.timeout(120)
def test_memory_returns_to_baseline_after_many_requests() -> None:
    """Finished and cancelled streams leave nothing behind in the engine."""
    with simulated_engine(step_time=0.0, max_new_tokens=8) as engine:
        for i in range(200):  # warm up caches, code paths
            engine.submit(f"warm {i}").result(timeout=30)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for round_ in range(5):
            streams = [engine.submit(f"m{round_}-{i}") for i in range(400)]
            for i, s in enumerate(streams):
                if i % 4 == 0:
                    s.cancel()
                else:
                    s.result(timeout=30)
            del streams, s
        gc.collect()
        assert wait_until(lambda: engine.in_flight == 0)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 512 * 1024, f"memory grew by {grown} bytes over 2,000 requests"


@pytest.mark.timeout(60)
def test_overload_is_refused_fast_under_concurrent_submitters() -> None:
    """Concurrent submitters beyond max_queued get Overloaded; admitted ones complete."""
    engine = simulated_engine(step_time=0.01, max_new_tokens=4, max_batch_size=2, max_queued=20)
    accepted: list[object] = []
    refused = 0
    lock = threading.Lock()

    def submit_many() -> None:
        nonlocal refused
        for i in range(50):
            try:
                s = engine.submit(f"o{threading.get_ident()}-{i}")
            except Overloaded:
                with lock:
                    refused += 1
            else:
                with lock:
                    accepted.append(s)

    threads = [threading.Thread(target=submit_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert refused > 0
    assert accepted
    gen: SimulatedGenerator = engine.backend.generator
    for s in accepted:
        completion = s.result(timeout=60)  # type: ignore[attr-defined]
        assert completion.text == gen.expected_text(s.request.prompt, 4)  # type: ignore[attr-defined]
    engine.close()
    assert engine.queued == 0
