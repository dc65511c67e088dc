"""Added latency of a non-streamed request through the Quart ``/v1`` gateway, before
and after passthrough stopped turning every request into an upstream stream.

One fake upstream (``tests/gateway_upstream.py``: ``--delay`` seconds before a whole
answer, and before each of its 9 streamed tokens), called directly and through two
Quart gateways under uvicorn over :class:`~llmbridge.backends.OpenAIBackend`:
``PASSTHROUGH=0`` (requests translated, the upstream always streamed: the behaviour
before) and the default (the body forwarded, a non-streamed upstream call). ``C``
client threads send non-streamed chat requests back to back; we print p50/p99 of each
and the p50 added over direct.

    python benchmarks/gateway_nonstreamed.py --requests 300 --concurrency 8

``--streams N`` measures the other question (issue 16, item 6): N concurrent streamed
requests at once through the Quart gateway, with each upstream's connections capped at
httpx's default of 100 (the limit before) and at the size now derived from
``max_concurrency``; it prints the p50/p99 time to the first chunk and to the end.

    python benchmarks/gateway_nonstreamed.py --streams 256
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(app: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    full = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", **env}
    argv = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log", "--log-level", "warning", app]  # fmt: skip
    proc = subprocess.Popen(argv, env=full)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{app} did not start")


def _run(url: str, requests: int, concurrency: int) -> list[float]:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    times: list[float] = []
    lock = threading.Lock()
    left = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            http.post(f"{url}/v1/chat/completions", json=body)  # warm the connection
            for _ in left:
                start = time.perf_counter()
                reply = http.post(f"{url}/v1/chat/completions", json=body)
                took = time.perf_counter() - start
                assert reply.status_code == 200, reply.text
                with lock:
                    times.append(took)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times


async def _streams(url: str, n: int) -> tuple[list[float], list[float]]:
    import asyncio

    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one() -> tuple[float, float]:
            start = time.perf_counter()
            first = None
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
                async for _ in reply.aiter_bytes():
                    first = first or time.perf_counter() - start
            return first or 0.0, time.perf_counter() - start

        await asyncio.gather(*(one() for _ in range(8)))  # warm up
        results = await asyncio.gather(*(one() for _ in range(n)))
    return sorted(r[0] for r in results), sorted(r[1] for r in results)


def _p(values: list[float], q: float) -> float:
    return 1000 * values[min(len(values) - 1, int(len(values) * q))]


def streams_main(n: int, delay: float) -> None:
    import asyncio

    procs = []
    try:
        upstream, up_url = _start("gateway_upstream:app", {"TOKEN_DELAY": str(delay)})
        procs.append(upstream)
        targets = {"direct": up_url}
        httpx_defaults = {"MAX_CONNECTIONS": "100"}
        pools = (("before (100 conns)", httpx_defaults), ("after (sized from 256)", {}))
        for name, extra in pools:
            env = {"GATEWAY_APP": "quart", "UPSTREAM_URLS": f"{up_url}/v1", **extra}
            proc, url = _start("gateway_apps:app", env)
            procs.append(proc)
            targets[name] = url
        for name, url in targets.items():
            first, total = asyncio.run(_streams(url, n))
            print(
                f"{name:30} first chunk p50 {_p(first, 0.5):7.1f} ms p99 {_p(first, 0.99):7.1f} ms"
                f"   total p50 {_p(total, 0.5):7.1f} ms p99 {_p(total, 0.99):7.1f} ms"
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.01)
    parser.add_argument("--streams", type=int, default=0)
    args = parser.parse_args()
    if args.streams:
        streams_main(args.streams, args.delay)
        return
    procs = []
    try:
        upstream, up_url = _start("gateway_upstream:app", {"TOKEN_DELAY": str(args.delay)})
        procs.append(upstream)
        targets = {"direct": up_url}
        for name, extra in (("before (streamed upstream)", {"PASSTHROUGH": "0"}), ("after", {})):
            env = {"GATEWAY_APP": "quart", "UPSTREAM_URLS": f"{up_url}/v1", **extra}
            proc, url = _start("gateway_apps:app", env)
            procs.append(proc)
            targets[name] = url
        p50s: dict[str, float] = {}
        for name, url in targets.items():
            times = sorted(_run(url, args.requests, args.concurrency))
            p50s[name] = statistics.median(times)
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            added = (
                ""
                if name == "direct"
                else f"  added p50 {1000 * (p50s[name] - p50s['direct']):+.1f} ms"
            )
            print(f"{name:28} p50 {1000 * p50s[name]:7.1f} ms  p99 {1000 * p99:7.1f} ms{added}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
