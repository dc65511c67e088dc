"""Concurrent SSE streams: native Starlette vs Quart + bridge vs Flask under three adapters.

Each server runs under uvicorn on 127.0.0.1 and serves ``N`` concurrent SSE streams of
20 tokens 50 ms apart (1.0 s each at best). For each we report wall time (all streams
done), first-token p50/p99, peak threads and peak RSS of the server process, and the
wall-time ratio to native Starlette. A run that passes ``--cutoff`` seconds is stopped
and reported with the number of streams that finished.

    python benchmarks/streams.py                      # 200 and 1,000 streams, 30 s cut-off
    python benchmarks/streams.py --streams 200 1000 3000 --full   # 120 s cut-off
    python benchmarks/streams.py --only native llmbridge --v1     # also the /v1 rows

``CPU ms/req`` is the server process's CPU time per finished stream: on a shared,
noisy machine it moves far less than wall time. ``--v1`` adds the OpenAI route
(``POST /v1/chat/completions``, ``"stream": true``) for native Starlette and Flask +
llmbridge.asgi; its ratio is to native ``/v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import free_port, wait_for_port  # noqa: E402

SERVERS = [
    ("starlette (native)", "stream_apps:starlette_app"),
    ("quart + bridge", "stream_apps:quart_app"),
    ("flask + llmbridge.asgi", "stream_apps:flask_llmbridge"),
    ("flask + a2wsgi", "stream_apps:flask_a2wsgi"),
    ("flask + asgiref WsgiToAsgi", "stream_apps:flask_asgiref"),
]
V1_SERVERS = [
    ("starlette (native) /v1", "stream_apps:starlette_app"),
    ("flask + llmbridge.asgi /v1", "stream_apps:flask_llmbridge"),
]


@dataclass
class Result:
    server: str
    streams: int
    finished: int = 0
    wall: float = 0.0
    cut: bool = False
    first_tokens: list[float] = field(default_factory=list)
    peak_threads: int = 0
    peak_rss_mb: float = 0.0
    cpu: float = 0.0  # the server process's CPU seconds (user + system) during the load


def proc_status(pid: int) -> tuple[int, float]:
    threads, rss = 0, 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return threads, rss


def request_bytes(prompt: str, v1: bool) -> bytes:
    if not v1:
        return (
            f"GET /sse?prompt={prompt} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
    body = json.dumps(
        {"model": "llmbridge", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far: less noisy than wall time on a busy box."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_stream(port: int, prompt: str, started: float, result: Result) -> None:
    v1 = result.server.endswith("/v1")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(prompt, v1))
        await writer.drain()
        seen = b""
        first = False
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            seen = seen[-64:] + chunk
            if not first and b"data: {" in seen:
                first = True
                result.first_tokens.append(time.perf_counter() - started)
            if b"event: done" in seen or b"event: error" in seen or b"data: [DONE]" in seen:
                result.finished += 1
                return
    finally:
        writer.close()


async def run_load(name: str, port: int, pid: int, n: int, cutoff: float) -> Result:
    result = Result(name, n)
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            threads, rss = proc_status(pid)
            result.peak_threads = max(result.peak_threads, threads)
            result.peak_rss_mb = max(result.peak_rss_mb, rss)
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    tasks = [asyncio.create_task(one_stream(port, f"s{i}", started, result)) for i in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=cutoff)
    result.wall = time.perf_counter() - started
    result.cpu = cpu_seconds(pid) - cpu_before
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            print(f"  {name}: a stream failed: {task.exception()!r}", file=sys.stderr)
    result.cut = bool(pending)
    stop.set()
    await sampler
    return result


def serve(name: str, target: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
         "--no-access-log", "--log-level", "warning", "--backlog", "4096",
         "--timeout-graceful-shutdown", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def bench(name: str, target: str, n: int, cutoff: float) -> Result:
    port = free_port()
    proc = serve(name, target, port)
    try:
        wait_for_port(port, timeout=60, proc=proc)
        asyncio.run(run_load(name, port, proc.pid, 1, 30))  # warm up
        return asyncio.run(run_load(name, port, proc.pid, n, cutoff))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def table(results: list[Result]) -> str:
    lines = [
        f"| {'server':<34} | {'streams':>7} | {'done':>5} | {'wall s':>7} | {'x native':>8} "
        f"| {'1st p50 s':>9} | {'1st p99 s':>9} | {'threads':>7} | {'RSS MB':>6} "
        f"| {'CPU ms/req':>10} |",
        f"|{'-' * 36}|{'-' * 9}:|{'-' * 6}:|{'-' * 8}:|{'-' * 9}:|{'-' * 10}:|{'-' * 10}:"
        f"|{'-' * 8}:|{'-' * 7}:|{'-' * 11}:|",
    ]
    native = {
        (r.streams, r.server.endswith("/v1")): r.wall
        for r in results
        if r.server.startswith("starlette")
    }
    for r in results:
        wall = f"{'>' if r.cut else ''}{r.wall:.1f}"
        base = native.get((r.streams, r.server.endswith("/v1")))
        ratio = f"{r.wall / base:.2f}" if base else "-"
        lines.append(
            f"| {r.server:<34} | {r.streams:>7} | {r.finished:>5} | {wall:>7} | {ratio:>8} "
            f"| {pct(r.first_tokens, 50):>9.2f} | {pct(r.first_tokens, 99):>9.2f} "
            f"| {r.peak_threads:>7} | {r.peak_rss_mb:>6.0f} "
            f"| {1000 * r.cpu / max(r.finished, 1):>10.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="30 s cut-off (the default)")
    mode.add_argument("--full", action="store_true", help="120 s cut-off")
    parser.add_argument("--streams", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--only", nargs="+", help="server names to run (substring match)")
    parser.add_argument("--v1", action="store_true", help="also the OpenAI /v1 rows")
    args = parser.parse_args()
    cutoff = 120.0 if args.full else 30.0
    results: list[Result] = []
    servers = SERVERS + (V1_SERVERS if args.v1 else [])
    for n in args.streams:
        for name, target in servers:
            if args.only and not any(o in name for o in args.only):
                continue
            print(f"{name}: {n} streams ...", file=sys.stderr, flush=True)
            results.append(bench(name, target, n, cutoff))
    print(table(results))


if __name__ == "__main__":
    main()
