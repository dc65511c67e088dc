"""What the engine thread of an ``OpenAIBackend`` spends per streamed answer, by httpcore
network backend: httpx's own (anyio) against one over plain ``asyncio`` streams.

An ``Engine(OpenAIBackend(...))`` in this process streams ``--streams`` chat answers one
after another from the fake upstream of ``benchmarks/gateway.py`` (20 ms to the first
token, 20 tokens 10 ms apart); the engine thread's CPU (``/proc/self/task``) per answer
is the figure. The two backends alternate over ``--repeat`` rounds, and each round's
ratio is printed. This measures an option, it changes nothing in llmbridge: httpx has no
public hook for a network backend, so the asyncio one is put in place through the
private ``AsyncHTTPTransport._pool`` here, and handles plain TCP only (no TLS, no
proxy), which is all the fake upstream needs.

Run: python benchmarks/httpcore_backends.py [--streams 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpcore
import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection over ``asyncio`` streams: a read is one ``StreamReader.read``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise NotImplementedError("this benchmark's backend speaks plain TCP only")

    def get_extra_info(self, info: str) -> Any:
        sock = self._writer.get_extra_info("socket")
        if info == "is_readable":
            from httpcore._utils import is_socket_readable

            return is_socket_readable(sock)
        return {"socket": sock, "server_addr": self._writer.get_extra_info("peername")}.get(info)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend interface over ``asyncio.open_connection``."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return AsyncioStream(reader, writer)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        raise NotImplementedError("this benchmark's backend speaks TCP only")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _thread_cpu(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, backend: str, streams: int) -> float:
    """Engine-thread CPU milliseconds per streamed answer."""
    from llmbridge import Engine
    from llmbridge.backends import OpenAIBackend

    original = httpx.AsyncHTTPTransport.__init__

    def with_asyncio(self: httpx.AsyncHTTPTransport, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._pool._network_backend = AsyncioBackend()

    if backend == "asyncio":
        httpx.AsyncHTTPTransport.__init__ = with_asyncio  # type: ignore[method-assign]
    try:
        messages = [{"role": "user", "content": "hi"}]
        with Engine(OpenAIBackend(url, model="sim")) as engine:
            for _ in range(5):  # warm: connections, imports
                "".join(engine.chat(messages))
            assert engine.thread is not None
            assert engine.thread.native_id is not None
            tid = engine.thread.native_id
            before = _thread_cpu(tid)
            for _ in range(streams):
                assert "".join(engine.chat(messages))
            return 1000 * (_thread_cpu(tid) - before) / streams
    finally:
        httpx.AsyncHTTPTransport.__init__ = original  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from support import free_port, wait_for_port

    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "gateway.py"), "--serve-upstream", str(port)], env=env
    )
    try:
        wait_for_port(port, proc=upstream)
        url = f"http://127.0.0.1:{port}/v1"
        runs: dict[str, list[float]] = {"anyio (httpx's)": [], "asyncio streams": []}
        for _ in range(args.repeat):
            for name in runs:
                runs[name].append(measure(url, name.split()[0], args.streams))
        print(
            f"{args.streams} streamed chats of 20 tokens, one after another; load average "
            f"{os.getloadavg()[0]:.1f}\n"
        )
        print("| httpcore network backend | engine-thread CPU per answer (median) | runs |")
        print("|---|---:|---|")
        for name, values in runs.items():
            each = ", ".join(f"{v:.1f}" for v in values)
            print(f"| {name} | {statistics.median(values):.1f} ms | {each} |")
        ratios = [a / b for a, b in zip(*runs.values(), strict=True)]
        print(f"\nanyio / asyncio: {', '.join(f'{r:.2f}x' for r in ratios)}")
    finally:
        upstream.kill()
        upstream.wait()
        time.sleep(0.1)


if __name__ == "__main__":
    main()
