"""Engine overhead: chunks/s through engine -> stream vs a bare queue handoff.

Both sides run the same zero-cost step "generator" (one token per job per step) on a
producer thread. The bare side hands every chunk to its consumer through the simplest
correct structure people write by hand: a ``queue.Queue`` per consumer thread, or an
``asyncio.Queue`` per consumer task fed by one ``call_soon_threadsafe`` per step. The
llmbridge side submits through :class:`llmbridge.Engine` and reads :class:`Stream`s.

Run: python benchmarks/engine_overhead.py [--async-consumers 1000] [--threads 64]
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import statistics
import threading
import time
from typing import Any

from llmbridge import Engine, Request
from llmbridge.backends import StepBackend

TOKEN = "tok "
READS: list[int] = []  # reads (wake-ups) the llmbridge consumers needed, per run


class ZeroCostGenerator:
    """A step generator that does no work: isolates the cost of delivery."""

    def __init__(self) -> None:
        self.jobs: dict[str, list[int]] = {}

    def make_job(self, request: Request) -> tuple[str, int]:
        return (request.id, int(request.params["tokens"]))

    def enqueue(self, job: tuple[str, int]) -> None:
        self.jobs[job[0]] = [0, job[1]]

    def cancel(self, job: tuple[str, int]) -> None:
        self.jobs.pop(job[0], None)

    def iterate(self) -> list[dict[str, Any]]:
        results = []
        done = []
        for identifier, state in self.jobs.items():
            state[0] += 1
            eos = state[0] >= state[1]
            results.append({"identifier": identifier, "text": TOKEN, "eos": eos})
            if eos:
                done.append(identifier)
        for identifier in done:
            del self.jobs[identifier]
        return results


def bare_threads(consumers: int, tokens: int) -> float:
    """queue.Queue per consumer thread, fed by one producer thread stepping all jobs."""
    queues = [queue.Queue[str | None]() for _ in range(consumers)]
    start = threading.Barrier(consumers + 1)
    received = [0] * consumers

    def consume(i: int) -> None:
        q = queues[i]
        start.wait()
        while True:
            item = q.get()
            if item is None:
                return
            received[i] += 1

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(consumers)]
    for t in threads:
        t.start()
    gen = ZeroCostGenerator()
    for i in range(consumers):
        gen.enqueue((str(i), tokens))
    start.wait()
    t0 = time.perf_counter()
    while gen.jobs:
        for result in gen.iterate():
            q = queues[int(result["identifier"])]
            q.put(result["text"])
            if result["eos"]:
                q.put(None)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert sum(received) == consumers * tokens
    return consumers * tokens / elapsed


def bare_async(consumers: int, tokens: int) -> float:
    """asyncio.Queue per task; the producer thread wakes the loop once per step."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue[str | None]() for _ in range(consumers)]
        received = [0] * consumers

        async def consume(i: int) -> None:
            q = queues[i]
            while True:
                item = await q.get()
                if item is None:
                    return
                received[i] += 1

        def deliver(batch: list[tuple[int, str | None]]) -> None:
            for i, item in batch:
                queues[i].put_nowait(item)

        def produce() -> None:
            gen = ZeroCostGenerator()
            for i in range(consumers):
                gen.enqueue((str(i), tokens))
            while gen.jobs:
                batch: list[tuple[int, str | None]] = []
                for result in gen.iterate():
                    i = int(result["identifier"])
                    batch.append((i, result["text"]))
                    if result["eos"]:
                        batch.append((i, None))
                loop.call_soon_threadsafe(deliver, batch)

        tasks = [asyncio.create_task(consume(i)) for i in range(consumers)]
        t0 = time.perf_counter()
        producer = threading.Thread(target=produce)
        producer.start()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        producer.join()
        assert sum(received) == consumers * tokens
        return consumers * tokens / elapsed

    return asyncio.run(main())


def engine_for(consumers: int) -> Engine:
    gen = ZeroCostGenerator()
    return Engine(
        StepBackend(gen, gen.make_job, max_batch_size=consumers), max_queued=consumers * 2
    )


def llmbridge_threads(consumers: int, tokens: int) -> float:
    """One Stream per consumer thread, read chunk by chunk with `for`."""
    engine = engine_for(consumers).start()
    start = threading.Barrier(consumers + 1)
    received = [0] * consumers
    streams = []

    reads = [0] * consumers

    def consume(i: int) -> None:
        stream = streams[i]
        start.wait()
        for chunk in stream:
            received[i] += len(chunk) // len(TOKEN)
            reads[i] += 1

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(consumers)]
    streams.extend(engine.submit("x", tokens=tokens) for _ in range(consumers))
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    engine.close()
    assert sum(received) == consumers * tokens
    READS.append(sum(reads))
    return consumers * tokens / elapsed


def llmbridge_async(consumers: int, tokens: int) -> float:
    """One Stream per task, read with `async for`."""

    async def main() -> float:
        engine = engine_for(consumers).start()

        reads = 0

        async def consume() -> int:
            nonlocal reads
            stream = engine.submit("x", tokens=tokens)
            n = 0
            async for chunk in stream:
                n += len(chunk)
                reads += 1
            return n // len(TOKEN)

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(consume() for _ in range(consumers)))
        elapsed = time.perf_counter() - t0
        await engine.aclose()
        assert sum(counts) == consumers * tokens
        READS.append(reads)
        return consumers * tokens / elapsed

    return asyncio.run(main())


def best_of(fn: Any, *args: Any, repeat: int) -> float:
    return statistics.median(fn(*args) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--async-consumers", type=int, default=1000)
    parser.add_argument("--async-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--thread-tokens", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="median of this many runs")
    args = parser.parse_args()

    rows = []
    for label, bare, ours, n, tokens in (
        (
            f"{args.async_consumers} async consumers",
            bare_async,
            llmbridge_async,
            args.async_consumers,
            args.async_tokens,
        ),
        (
            f"{args.threads} consumer threads",
            bare_threads,
            llmbridge_threads,
            args.threads,
            args.thread_tokens,
        ),
    ):
        # Interleave the two sides so machine noise hits both alike.
        bare_rate = best_of(bare, n, tokens, repeat=args.repeat)
        READS.clear()
        our_rate = best_of(ours, n, tokens, repeat=args.repeat)
        share = statistics.median(READS) / (n * tokens)
        rows.append((label, bare_rate, our_rate, share))

    print(f"{'scenario':<26} {'bare handoff':>16} {'llmbridge':>16} {'ratio':>7} {'reads':>7}")
    for label, bare_rate, our_rate, share in rows:
        print(
            f"{label:<26} {bare_rate:>12,.0f} c/s {our_rate:>12,.0f} c/s "
            f"{our_rate / bare_rate:>6.2f}x {share:>6.0%}"
        )
    print("c/s = chunks (tokens) delivered to consumers per second, median of", args.repeat)
    print("reads = llmbridge reads per chunk produced (coalescing; the bare side reads 100%)")


if __name__ == "__main__":
    main()
