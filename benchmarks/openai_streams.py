"""Concurrent streamed ``/v1/chat/completions`` on the OpenAI blueprints.

The Flask blueprint under uvicorn through ``llmbridge.asgi`` (and, for reference, the
Quart blueprint under uvicorn) serves ``N`` concurrent streams of 20 tokens 50 ms apart
(1.0 s each at best) from an async generator behind an engine. Reported: wall time
until every stream ended, first-chunk p50/p99, and the server's peak thread count.

    python benchmarks/openai_streams.py                  # 200 streams
    python benchmarks/openai_streams.py --streams 200 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import free_port, wait_for_port  # noqa: E402

SERVERS = [
    ("flask blueprint + llmbridge.asgi", "openai_streams:flask_asgi"),
    ("quart blueprint", "openai_streams:quart_app"),
]


async def tokens(prompt: str, **_: object) -> AsyncIterator[str]:
    """The model: 20 tokens, 50 ms apart (as benchmarks/stream_apps.py)."""
    for i in range(20):
        await asyncio.sleep(0.05)
        yield f" t{i}"


def _engine() -> object:
    from llmbridge import Engine
    from llmbridge.backends import CallableBackend

    return Engine(CallableBackend(tokens, max_concurrency=4096), max_queued=8192)


def _settings() -> object:
    from llmbridge.openai import Settings

    return Settings(models=("sim",))


def __getattr__(name: str) -> object:
    # The apps, built only in the server process that imports them.
    if name == "flask_asgi":
        from flask import Flask

        from llmbridge.asgi import to_asgi
        from llmbridge.openai import flask_blueprint

        app = Flask(__name__)
        app.register_blueprint(flask_blueprint(_engine(), auth=None, settings=_settings()))  # type: ignore[arg-type]
        return to_asgi(app)
    if name == "quart_app":
        from quart import Quart

        from llmbridge.openai import quart_blueprint

        qapp = Quart(__name__)
        qapp.register_blueprint(quart_blueprint(_engine(), auth=None, settings=_settings()))  # type: ignore[arg-type]
        return qapp
    raise AttributeError(name)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


async def _run(url: str, pid: int, streams: int) -> tuple[float, list[float], int]:
    import httpx

    firsts: list[float] = []
    peak = 0
    body = {
        "model": "sim",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 20,
        "stream": True,
    }

    async def one(client: httpx.AsyncClient, start: float) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            seen = False
            async for line in response.aiter_lines():
                if not seen and '"content":"' in line and '"content":""' not in line:
                    firsts.append(time.monotonic() - start)
                    seen = True

    async def sample(done: asyncio.Event) -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _threads(pid))
            await asyncio.sleep(0.1)

    limits = httpx.Limits(max_connections=streams + 10)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        done = asyncio.Event()
        sampler = asyncio.ensure_future(sample(done))
        start = time.monotonic()
        await asyncio.gather(*(one(client, start) for _ in range(streams)))
        wall = time.monotonic() - start
        done.set()
        await sampler
    return wall, firsts, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[200])
    args = parser.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])
    print(f"{'server':34} {'streams':>7} {'wall s':>7} {'first p50':>9} {'p99':>6} {'threads':>7}")
    for label, target in SERVERS:
        for streams in args.streams:
            port = free_port()
            argv = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--no-access-log", "--log-level", "warning", target]
            proc = subprocess.Popen(argv, env=env, cwd=ROOT / "benchmarks")
            try:
                wait_for_port(port, proc=proc)
                wall, firsts, peak = asyncio.run(
                    _run(f"http://127.0.0.1:{port}", proc.pid, streams)
                )
            finally:
                proc.terminate()
                proc.wait(30)
            p50 = statistics.median(firsts)
            p99 = statistics.quantiles(firsts, n=100)[98] if len(firsts) > 1 else p50
            print(f"{label:34} {streams:>7} {wall:>7.2f} {p50:>9.3f} {p99:>6.3f} {peak:>7}")


if __name__ == "__main__":
    main()
