"""Head-of-line blocking: a GIL-holding client call vs ``/ping``, plain Flask vs offload.

Scenario 1 of issue 3, side by side in one run under ``gunicorn -k gthread --threads 8``
(one worker): four clients keep ``/llm`` busy with a 0.8 s call whose client holds the
GIL (a ``ctypes.PyDLL`` call, as BAML's sync client before 0.77 did), while a fifth
measures ``/ping``. ``plain`` calls the client in the request thread; ``offload`` runs it
with ``bridge.to_process``.

    python benchmarks/head_of_line.py            # ~30 s
    python benchmarks/head_of_line.py --seconds 20 --call 0.8
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from flask import Flask

from llmbridge.flask import FlaskBridge
from llmbridge.testing import simulated_engine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_libc = ctypes.PyDLL(None)


def gil_holding_call(seconds: float) -> str:
    """Wait ``seconds`` in C while holding the GIL, like a client that never releases it."""
    _libc.usleep(int(seconds * 1_000_000))
    return "done"


def create_app(mode: str) -> Flask:
    """The benchmark app: ``/ping`` and ``/llm``, with the call ``plain`` or offloaded."""
    app = Flask(__name__)
    bridge = FlaskBridge(app, engine=simulated_engine(), max_processes=4)
    seconds = float(os.environ.get("HOL_CALL_SECONDS", "0.8"))

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    @app.get("/llm")
    def llm() -> str:
        if mode == "offload":
            return bridge.to_process(gil_holding_call, seconds)
        return gil_holding_call(seconds)

    return app


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("gunicorn exited early")
        try:
            httpx.get(f"{url}/ping", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up")


def measure(mode: str, seconds: float, call: float, busy: int) -> dict[str, float]:
    """Serve ``mode`` under gunicorn gthread; return /ping latencies while ``busy``
    clients keep /llm saturated."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HOL_CALL_SECONDS=str(call))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-w", "1"]
    # The plain worker holds the GIL for seconds at a time and misses gunicorn's worker
    # heartbeat; under machine load the arbiter then kills it mid-measurement.
    args += ["--timeout", "300"]
    args += ["-b", f"127.0.0.1:{port}", f"head_of_line:create_app('{mode}')"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, env=env, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url, proc)
            # Warm up: the offload pool starts its worker processes on first use.
            warm = [
                threading.Thread(target=httpx.get, args=(f"{url}/llm",), kwargs={"timeout": 60})
                for _ in range(busy)
            ]
            for thread in warm:
                thread.start()
            for thread in warm:
                thread.join()

            stop = threading.Event()
            llm_calls = 0

            def keep_busy() -> None:
                nonlocal llm_calls
                with httpx.Client(timeout=60) as client:
                    while not stop.is_set():
                        client.get(f"{url}/llm").raise_for_status()
                        llm_calls += 1

            workers = [threading.Thread(target=keep_busy) for _ in range(busy)]
            for worker in workers:
                worker.start()
            time.sleep(call / 2)  # let the calls get going
            latencies: list[float] = []
            deadline = time.monotonic() + seconds
            with httpx.Client(timeout=60) as client:
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    client.get(f"{url}/ping").raise_for_status()
                    latencies.append((time.perf_counter() - started) * 1000)
                    time.sleep(0.01)
            stop.set()
            for worker in workers:
                worker.join()
        finally:
            proc.terminate()
            proc.wait(30)
    latencies.sort()
    return {
        "pings": len(latencies),
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "llm_calls": llm_calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="ping time per mode")
    parser.add_argument("--call", type=float, default=0.8, help="GIL-holding call, seconds")
    parser.add_argument("--busy", type=int, default=4, help="concurrent /llm clients")
    args = parser.parse_args()
    results = {
        mode: measure(mode, args.seconds, args.call, args.busy) for mode in ("plain", "offload")
    }
    plain, offload = results["plain"], results["offload"]
    print(
        f"\n/ping under gunicorn gthread (8 threads), {args.busy} clients on a "
        f"{args.call} s GIL-holding call, {args.seconds:.0f} s per mode\n"
    )
    print(f"{'mode':<10}{'pings':>8}{'p50 ms':>12}{'p99 ms':>12}{'/llm calls':>12}")
    for mode, r in results.items():
        print(f"{mode:<10}{r['pings']:>8}{r['p50']:>12.1f}{r['p99']:>12.1f}{r['llm_calls']:>12}")
    print(
        f"\noffload vs plain: p50 {plain['p50'] / offload['p50']:.0f}x better, "
        f"p99 {plain['p99'] / offload['p99']:.0f}x better"
    )


if __name__ == "__main__":
    main()
