"""Dynamic batching: batched vs unbatched throughput and p50 latency, side by side.

The batch function costs a fixed ``--fixed`` ms plus ``--per-item`` ms per request (a
model whose forward pass costs about the same for 1 row as for 32, like a GPU). Both
modes use one :class:`~llmbridge.policies.BatchBackend` driving that one function;
"unbatched" is ``max_batch_size=1``. ``C`` closed-loop client threads each send requests
back to back; we report requests/s and p50 latency at 1, 8, 32 and 128 concurrent.

    python benchmarks/batching.py
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from llmbridge import Engine, Request
from llmbridge.policies import BatchBackend


def make_fn(fixed: float, per_item: float):  # type: ignore[no-untyped-def]
    def fn(requests: list[Request]) -> list[str]:
        time.sleep(fixed + per_item * len(requests))
        return [r.prompt for r in requests]

    return fn


def run(backend: BatchBackend, clients: int, per_client: int) -> tuple[float, float]:
    latencies: list[float] = []
    lock = threading.Lock()
    with Engine(backend, max_queued=10_000) as engine:
        engine.submit("warm-up").result(30)
        barrier = threading.Barrier(clients + 1)

        def client(c: int) -> None:
            mine = []
            barrier.wait()
            for i in range(per_client):
                t0 = time.perf_counter()
                engine.submit(f"{c}-{i}").result(60)
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    return len(latencies) / wall, statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixed", type=float, default=20.0, help="ms per batch call")
    parser.add_argument("--per-item", type=float, default=0.5, help="ms per request")
    parser.add_argument("--delay", type=float, default=0.0, help="max_queue_delay, ms")
    args = parser.parse_args()
    fn = make_fn(args.fixed / 1000, args.per_item / 1000)
    print(
        f"batch call = {args.fixed} ms + {args.per_item} ms/item, "
        f"max_queue_delay = {args.delay} ms\n"
    )
    header = (
        f"{'concurrent':>10} | {'unbatched req/s':>15} | {'p50 ms':>7} | "
        f"{'batched req/s':>13} | {'p50 ms':>7} | {'throughput x':>12} | {'mean batch':>10}"
    )
    print(header)
    print("-" * len(header))
    for clients in (1, 8, 32, 128):
        per_client = max(3, 256 // clients) if clients > 1 else 40
        plain = BatchBackend(fn, max_batch_size=1)
        batched = BatchBackend(fn, max_batch_size=128, max_queue_delay=args.delay / 1000)
        rps_plain, p50_plain = run(plain, clients, per_client)
        rps_batched, p50_batched = run(batched, clients, per_client)
        sizes = batched.batch_sizes[1:] or [1]
        print(
            f"{clients:>10} | {rps_plain:>15.1f} | {p50_plain * 1000:>7.1f} | "
            f"{rps_batched:>13.1f} | {p50_batched * 1000:>7.1f} | "
            f"{rps_batched / rps_plain:>12.1f} | {statistics.mean(sizes):>10.1f}"
        )


if __name__ == "__main__":
    main()
