"""What reading an upstream's stream costs the engine thread, by HTTP client and event loop.

The fake upstream of ``benchmarks/gateway.py`` (20 ms to the first token, 20 tokens
10 ms apart) streams ``--streams`` chat answers one after another to each reader; the
figure is the reading thread's CPU (``time.thread_time``) per answer. Readers:

- ``httpx`` and ``aiohttp`` alone (read the body, nothing else), each on asyncio's
  loop and on uvloop's: what the client library and the loop cost;
- ``llmbridge``: an ``Engine(OpenAIBackend(...))`` relaying the client's body (what the
  ``/v1`` routes send it), measured on the engine thread, whose loop is uvloop's when
  uvloop is installed: the client plus llmbridge's SSE relay and the hand-off to
  the consumer (a thread here).

The readers alternate over ``--repeat`` rounds; the table gives each one's median and
its ratio to the cheapest. This is why ``OpenAIBackend`` reads upstreams with aiohttp
on the engine thread's uvloop loop.

Run: python benchmarks/upstream_clients.py [--streams 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MESSAGES = [{"role": "user", "content": "hi"}]
BODY = {"model": "sim", "messages": MESSAGES, "stream": True, "max_tokens": 20}
WARM = 5


async def _read_httpx(url: str, streams: int) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def one() -> None:
            async with client.stream("POST", "/chat/completions", json=BODY) as response:
                async for _ in response.aiter_bytes():
                    pass

        return await _per_answer(one, streams)


async def _read_aiohttp(url: str, streams: int) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            async with session.post(f"{url}/chat/completions", json=BODY) as response:
                async for _ in response.content.iter_any():
                    pass

        return await _per_answer(one, streams)


async def _per_answer(one: Callable[[], Coroutine[Any, Any, None]], streams: int) -> float:
    for _ in range(WARM):  # connections, imports
        await one()
    start = time.thread_time()
    for _ in range(streams):
        await one()
    return 1000 * (time.thread_time() - start) / streams


def _on_loop(read: Callable[[str, int], Coroutine[Any, Any, float]], loop: str) -> Any:
    def run(url: str, streams: int) -> float:
        if loop == "uvloop":
            import uvloop

            return uvloop.run(read(url, streams))
        return asyncio.run(read(url, streams))

    return run


def _llmbridge(url: str, streams: int) -> float:
    from llmbridge import Engine
    from llmbridge.backends import OpenAIBackend

    with Engine(OpenAIBackend(url, model="sim")) as engine:
        for _ in range(WARM):
            "".join(engine.submit("", openai=BODY))
        assert engine.thread is not None
        assert engine.thread.native_id is not None
        tid = engine.thread.native_id
        before = _thread_cpu(tid)
        for _ in range(streams):
            assert "".join(engine.submit("", openai=BODY))
        return 1000 * (_thread_cpu(tid) - before) / streams


def _thread_cpu(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from support import free_port, wait_for_port

    readers: dict[str, Callable[[str, int], float]] = {
        "httpx, asyncio loop": _on_loop(_read_httpx, "asyncio"),
        "httpx, uvloop": _on_loop(_read_httpx, "uvloop"),
        "aiohttp, asyncio loop": _on_loop(_read_aiohttp, "asyncio"),
        "aiohttp, uvloop": _on_loop(_read_aiohttp, "uvloop"),
        "llmbridge OpenAIBackend (engine thread)": _llmbridge,
    }
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "gateway.py"), "--serve-upstream", str(port)], env=env
    )
    try:
        wait_for_port(port, proc=upstream)
        url = f"http://127.0.0.1:{port}/v1"
        runs: dict[str, list[float]] = {name: [] for name in readers}
        load = os.getloadavg()[0]
        for _ in range(args.repeat):
            for name, read in readers.items():
                runs[name].append(read(url, args.streams))
        medians = {name: statistics.median(values) for name, values in runs.items()}
        cheapest = min(medians.values())
        print(
            f"{args.streams} streamed chats of 20 tokens, one after another, {args.repeat} "
            f"rounds; load average {load:.1f} at the start\n"
        )
        print("| reader | CPU ms per answer (median) | ratio to the cheapest | rounds |")
        print("|---|---:|---:|---|")
        for name, values in runs.items():
            each = ", ".join(f"{v:.2f}" for v in values)
            print(f"| {name} | {medians[name]:.2f} | {medians[name] / cheapest:.2f} | {each} |")
    finally:
        upstream.kill()
        upstream.wait()


if __name__ == "__main__":
    main()
