"""What observing costs: chunks/s through engine -> stream with and without metrics,
the per-request log line and a client request id.

The engine overhead benchmark's zero-cost step generator (``engine_overhead.py``), run
twice per scenario, interleaved: "without" is a plain engine; "with" is the same engine
instrumented with the ``llmbridge:`` metrics (``llmbridge.metrics.instrument``), every
request submitted under its own ``request_id``, and one JSON log line per request written
at its end through the bridges' own path (``RequestRecord`` -> ``JsonLogFormatter``, to
``os.devnull``). The short-request scenario is where a per-request cost shows most.

Run: python benchmarks/observe_overhead.py [--repeat 5] [--multiprocess]
(``--multiprocess``: prometheus-client's multiprocess mode, as under gunicorn -w N.)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_overhead import TOKEN, engine_for

from llmbridge import Engine, JsonLogFormatter
from llmbridge._web.reqlog import RequestRecord

_ids = iter(range(1, 1 << 62))


def observed(engine: Engine, on: bool) -> Engine:
    if on:
        from llmbridge.metrics import instrument

        instrument(engine)
    return engine


def submit(engine: Engine, on: bool, tokens: int) -> tuple[Any, RequestRecord | None]:
    if not on:
        return engine.submit("x", tokens=tokens), None
    record = RequestRecord("POST", "/bench")
    stream = engine.submit("x", request_id=f"bench-{next(_ids)}", tokens=tokens)
    record.stream = stream
    return stream, record


def threads(consumers: int, tokens: int, requests: int, on: bool) -> tuple[float, float]:
    """``consumers`` threads, each reading ``requests`` streams of ``tokens`` in turn."""
    engine = observed(engine_for(consumers), on).start()
    start = threading.Barrier(consumers + 1)
    received = [0] * consumers

    def consume(i: int) -> None:
        start.wait()
        for _ in range(requests):
            stream, record = submit(engine, on, tokens)
            for chunk in stream:
                received[i] += len(chunk) // len(TOKEN)
            if record is not None:
                record.finish(200)

    workers = [threading.Thread(target=consume, args=(i,)) for i in range(consumers)]
    for t in workers:
        t.start()
    start.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for t in workers:
        t.join()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    engine.close()
    chunks = consumers * tokens * requests
    assert sum(received) == chunks
    return chunks / elapsed, chunks / cpu


def tasks(consumers: int, tokens: int, on: bool) -> tuple[float, float]:
    """``consumers`` tasks on one loop, one stream each."""

    async def main() -> tuple[float, float]:
        engine = observed(engine_for(consumers), on).start()

        async def consume() -> int:
            stream, record = submit(engine, on, tokens)
            n = 0
            async for chunk in stream:
                n += len(chunk)
            if record is not None:
                record.finish(200)
            return n // len(TOKEN)

        t0, c0 = time.perf_counter(), time.process_time()
        counts = await asyncio.gather(*(consume() for _ in range(consumers)))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        await engine.aclose()
        assert sum(counts) == consumers * tokens
        return consumers * tokens / elapsed, consumers * tokens / cpu

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="median of this many runs")
    parser.add_argument("--multiprocess", action="store_true")
    parser.add_argument("--cpu-only", action="store_true", help="skip the wall-clock table")
    parser.add_argument(
        "--best", action="store_true", help="best of the runs, not the median (noisy machines)"
    )
    args = parser.parse_args()
    if args.multiprocess:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llmbridge-prom-")
    handler = logging.FileHandler(os.devnull)
    handler.setFormatter(JsonLogFormatter())
    log = logging.getLogger("llmbridge.request")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    scenarios: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("1000 async x 200 tokens", tasks, (1000, 200)),
        ("64 threads x 2000 tokens", threads, (64, 2000, 1)),
        ("16 threads x 200 x 16-token", threads, (16, 16, 200)),
    ]
    # Columns: nothing; metrics + request id (log line below INFO: nothing is built);
    # metrics + request id + the JSON log line.
    modes = (("without", False, logging.WARNING), ("metrics+id", True, logging.WARNING))
    modes += (("+log line", True, logging.INFO),)
    for unit, column in (("chunks per CPU second", 1), ("chunks per wall second", 0)):
        print(f"\n{unit}")
        print(f"{'scenario':<28}" + "".join(f" {name:>12} {'change':>7}" for name, *_ in modes))
        for label, fn, scenario_args in scenarios:
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in modes}
            for _ in range(args.repeat):  # interleaved: machine noise hits all alike
                for name, on, level in modes:
                    log.setLevel(level)
                    runs[name].append(fn(*scenario_args, on))
            pick = max if args.best else statistics.median
            base = pick(r[column] for r in runs["without"])
            cells = ""
            for name, *_ in modes:
                rate = pick(r[column] for r in runs[name])
                cells += f" {rate:>12,.0f} {rate / base - 1:>+7.1%}"
            print(f"{label:<28}{cells}")
        if args.cpu_only:
            break
    mode = "multiprocess" if args.multiprocess else "single-process"
    stat = "best" if args.best else "median"
    print(f"{stat} of {args.repeat} interleaved runs; prometheus-client {mode} mode")


if __name__ == "__main__":
    main()
