"""Response cache and single-flight under a Zipf workload, memory vs Redis, side by side.

1,000 distinct deterministic prompts drawn from a Zipf(s=1.1) distribution, 50 client
threads sending ``--requests`` requests in total through a :class:`Pipeline` over an
async backend that takes ``--latency`` ms per call. For each configuration: cache hit
rate, backend calls (and the share saved against no cache), requests coalesced by
single-flight, and p50/p99 latency. Redis runs are against a redis-server this script
starts on 127.0.0.1 (an ephemeral port) and stops.

    python benchmarks/cache.py
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from llmbridge import Engine  # noqa: E402
from llmbridge.policies import MemoryCache, Pipeline, RedisCache  # noqa: E402

from support import free_port, wait_for_port  # noqa: E402


def workload(n: int, prompts: int, s: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (k**s) for k in range(1, prompts + 1)]
    return [f"prompt-{k}" for k in rng.choices(range(prompts), weights=weights, k=n)]


def run(pipeline: Pipeline, requests: list[str], clients: int) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    shares = [requests[i::clients] for i in range(clients)]
    barrier = threading.Barrier(clients)

    def client(mine: list[str]) -> None:
        out = []
        barrier.wait()
        for prompt in mine:
            t0 = time.perf_counter()
            pipeline.submit(prompt, temperature=0).result(60)
            out.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(out)

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--latency", type=float, default=50.0, help="ms per backend call")
    args = parser.parse_args()
    latency = args.latency / 1000

    calls = [0]

    async def backend(prompt: str, **params: object) -> str:
        calls[0] += 1  # on the engine's loop: one thread
        await asyncio.sleep(latency)
        return f"answer to {prompt}"

    requests = workload(args.requests, 1000, 1.1, seed=1)
    distinct = len(set(requests))
    binary = shutil.which("redis-server")
    redis_proc = None
    url = None
    if binary:
        port = free_port()
        redis_proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port, proc=redis_proc)
        url = f"redis://127.0.0.1:{port}/0"
    configs: list[tuple[str, object, bool]] = [
        ("no cache", None, False),
        ("no cache, single-flight", None, True),
        ("memory", "memory", False),
        ("memory + single-flight", "memory", True),
    ]
    if url:
        configs += [("redis", "redis", False), ("redis + single-flight", "redis", True)]
    print(
        f"{args.requests} requests, {distinct} distinct of 1,000 prompts (Zipf s=1.1), "
        f"{args.clients} clients, backend {args.latency} ms/call\n"
    )
    header = (
        f"{'configuration':<24} | {'hit rate':>8} | {'backend calls':>13} | {'saved':>6} | "
        f"{'coalesced':>9} | {'p50 ms':>7} | {'p99 ms':>7}"
    )
    print(header)
    print("-" * len(header))
    try:
        for name, kind, single_flight in configs:
            cache: object = None
            if kind == "memory":
                cache = MemoryCache(max_entries=2000)
            elif kind == "redis":
                assert url is not None
                cache = RedisCache(url, prefix=f"bench-{uuid.uuid4().hex}:")
            pipeline = Pipeline(
                Engine(backend),
                cache=cache,  # type: ignore[arg-type]
                single_flight=single_flight,
            )
            pipeline.start()
            calls[0] = 0
            latencies = run(pipeline, requests, args.clients)
            pipeline.close()
            stats = pipeline.stats
            lookups = stats.cache_hits + stats.cache_misses
            hit_rate = stats.cache_hits / lookups if lookups else 0.0
            saved = 1 - calls[0] / len(requests)
            q = statistics.quantiles(latencies, n=100)
            print(
                f"{name:<24} | {hit_rate:>7.1%} | {calls[0]:>13} | {saved:>5.1%} | "
                f"{stats.coalesced:>9} | {q[49] * 1000:>7.1f} | {q[98] * 1000:>7.1f}"
            )
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
    if not url:
        print("\n(redis-server not found: Redis rows skipped)")


if __name__ == "__main__":
    main()
