"""One engine per host against one engine per worker: same 4 workers, same load.

Both sides serve the same Flask app (``to_asgi``) under ``uvicorn --workers 4``, with a
:class:`SimulatedGenerator` per engine that stands for a model on one GPU:

- every copy holds ``--model-mb`` of touched memory (its "weights"), and
- every step holds an ``fcntl`` lock on one file for its whole duration, so the
  per-worker copies' steps serialise as N model copies on one device do; a step costs
  ``step_time * batch ** batch_exponent`` (sub-linear: decoding is memory-bound, a
  larger batch costs little more per step).

*per-worker*: each worker builds its own engine (no socket configured). *shared*: the
workers' ``shared_engine(make_engine)`` connects to ``python -m llmbridge serve`` on a
Unix socket. The load is closed-loop: ``--streams`` clients, each streaming one request
after another for ``--seconds``. Reported: tokens/s, p50/p99 time to first token, mean
batch size per step, total RSS of the processes that hold a model; then the per-chunk
cost of the process hop against a local engine (one stream, zero-cost steps, in this
process).

Run: python benchmarks/shared_engine.py [--streams 64] [--seconds 8] [--model-mb 200]
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVE = [sys.executable, "-m", "llmbridge", "serve"]
UVICORN = [sys.executable, "-m", "uvicorn", "shared_engine:asgi_app", "--log-level", "warning"]


# -- the app both sides serve (built lazily: the driver imports this module too) ----------


def make_engine() -> Any:
    """An engine over a device-sharing SimulatedGenerator (what holds the model)."""
    from llmbridge import Engine
    from llmbridge.backends import StepBackend
    from llmbridge.testing import SimulatedGenerator

    class DeviceGenerator(SimulatedGenerator):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            self.weights = bytearray(int(os.environ.get("BENCH_MODEL_MB", "200")) << 20)
            for i in range(0, len(self.weights), 4096):
                self.weights[i] = 1  # touch every page: resident, like loaded weights
            self.lock = open(os.environ["BENCH_DEVICE_LOCK"], "a")  # noqa: SIM115
            self.report = os.path.join(os.environ["BENCH_DIR"], f"steps-{os.getpid()}.json")
            self.batched = 0
            self.stepped = 0

        def iterate(self) -> list[dict[str, Any]]:
            n = self.jobs_in_flight
            fcntl.flock(self.lock, fcntl.LOCK_EX)  # one device: one step at a time
            try:
                results = super().iterate()
            finally:
                fcntl.flock(self.lock, fcntl.LOCK_UN)
            if n:
                self.batched += n
                self.stepped += 1
                if self.stepped % 20 == 0:
                    self.save()
            return results

        def save(self) -> None:
            with open(self.report, "w") as f:
                json.dump({"pid": os.getpid(), "steps": self.stepped, "jobs": self.batched}, f)

    generator = DeviceGenerator(
        step_time=float(os.environ.get("BENCH_STEP", "0.05")),
        batch_exponent=float(os.environ.get("BENCH_EXPONENT", "0.25")),
    )
    with open(os.path.join(os.environ["BENCH_DIR"], f"model-{os.getpid()}"), "w"):
        pass  # this process holds a model
    backend = StepBackend(generator, generator.make_job, max_batch_size=256)
    return Engine(backend, max_queued=4096)


_built: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    # uvicorn and llmbridge serve look up ``asgi_app`` / ``engine``: build on first use.
    if name not in ("asgi_app", "engine"):
        raise AttributeError(name)
    if not _built:
        import flask

        from llmbridge.asgi import to_asgi
        from llmbridge.flask import FlaskBridge
        from llmbridge.gunicorn import shared_engine

        engine = shared_engine(make_engine)
        app = flask.Flask(__name__)
        bridge = FlaskBridge(app, engine=engine)

        @app.get("/sse")
        def sse() -> Any:
            n = int(flask.request.args.get("n", "32"))
            return bridge.sse(flask.request.args.get("p", "x"), max_new_tokens=n)

        _built.update(engine=engine, asgi_app=to_asgi(app))
    return _built[name]


# -- the driver ------------------------------------------------------------------------


def _env(folder: Path, args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LLMBRIDGE_ENGINE_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE)])
    env.update(
        BENCH_DIR=str(folder),
        BENCH_DEVICE_LOCK=str(folder / "device.lock"),
        BENCH_MODEL_MB=str(args.model_mb),
        BENCH_STEP=str(args.step_time),
        BENCH_EXPONENT=str(args.batch_exponent),
    )
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def _load(url: str, streams: int, seconds: float, tokens: int) -> dict[str, Any]:
    import httpx

    ttfts: list[float] = []
    produced = 0
    errors = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal produced, errors
            n = 0
            while time.monotonic() < deadline:
                began = time.monotonic()
                first = None
                params = {"p": f"c{i}-{n}", "n": tokens}
                async with client.stream("GET", "/sse", params=params) as r:
                    if r.status_code != 200:
                        errors += 1
                        await r.aread()
                        continue
                    async for line in r.aiter_lines():
                        if first is None and line.startswith("data:"):
                            first = time.monotonic() - began
                        if line.startswith("event: done"):
                            produced += tokens
                    if first is not None:
                        ttfts.append(first)
                n += 1

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(streams)))
        elapsed = time.monotonic() - started
    ttfts.sort()
    return {
        "tokens_per_s": produced / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
        if ttfts
        else float("nan"),
        "errors": errors,
    }


def _wait_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(port)


def run_side(shared: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration: start it, warm it, load it, measure it, stop it."""
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        folder = Path(tmp)
        env = _env(folder, args)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            if shared:
                from llmbridge._host.process import wait_ready

                sock = str(folder / "engine.sock")
                engine = subprocess.Popen(
                    [*SERVE, "shared_engine:engine", "--socket", sock, "--no-restart"],
                    env=env,
                    cwd=str(HERE),
                )
                procs.append(engine)
                wait_ready(sock, timeout=60, proc=engine)
                env["LLMBRIDGE_ENGINE_SOCKET"] = sock
            port = _free_port()
            server = subprocess.Popen(
                [*UVICORN, "--workers", str(args.workers), "--port", str(port)],
                env=env,
                cwd=str(HERE),
            )
            procs.append(server)
            _wait_port(port)
            url = f"http://127.0.0.1:{port}"
            asyncio.run(_load(url, args.workers * 2, 1.5, 4))  # warm every worker
            for report in folder.glob("steps-*.json"):
                report.unlink()
            result = asyncio.run(_load(url, args.streams, args.seconds, args.tokens))
            holders = [int(p.name.split("-")[1]) for p in folder.glob("model-*")]
            result["model_processes"] = len(holders)
            result["model_rss_mb"] = sum(_rss_mb(pid) for pid in holders)
            time.sleep(0.5)
            steps = jobs = 0
            for report in folder.glob("steps-*.json"):
                data = json.loads(report.read_text())
                steps += data["steps"]
                jobs += data["jobs"]
            result["mean_batch"] = jobs / steps if steps else float("nan")
            return result
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


def hop_cost(tokens: int = 3000) -> dict[str, float]:
    """Microseconds per token (one token per step, each sent as its own chunk) of one
    stream: a local engine vs the same engine behind the socket (zero-cost steps, read
    in a thread; best of 3)."""
    from llmbridge import Engine
    from llmbridge._host.process import wait_ready
    from llmbridge.backends import StepBackend
    from llmbridge.gunicorn import EngineClient
    from llmbridge.testing import SimulatedGenerator

    def per_chunk(engine: Any) -> float:
        best = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            text = "".join(engine.submit("hop", max_new_tokens=tokens))
            assert text
            best = min(best, (time.perf_counter() - began) / tokens * 1e6)
        return best

    generator = SimulatedGenerator(step_time=0.0, max_new_tokens=tokens)
    with Engine(StepBackend(generator, generator.make_job)) as local:
        local_us = per_chunk(local)
    with tempfile.TemporaryDirectory(prefix="bench-hop-") as tmp:
        sock = os.path.join(tmp, "engine.sock")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        code = (
            "from llmbridge.testing import simulated_engine\n"
            f"engine = simulated_engine(step_time=0.0, max_new_tokens={tokens})\n"
        )
        Path(tmp, "hop_target.py").write_text(code)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), tmp])
        proc = subprocess.Popen(
            [*SERVE, "hop_target:engine", "--socket", sock, "--no-restart"],
            env=env,
            cwd=tmp,
        )
        try:
            wait_ready(sock, timeout=60, proc=proc)
            client = EngineClient(sock)
            try:
                hop_us = per_chunk(client)
            finally:
                client.close(5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return {"local_us": local_us, "hop_us": hop_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model-mb", type=int, default=200)
    parser.add_argument("--step-time", type=float, default=0.05)
    parser.add_argument("--batch-exponent", type=float, default=0.25)
    args = parser.parse_args()
    sides = {"per-worker": run_side(False, args), "shared": run_side(True, args)}
    print(
        f"{args.workers} workers, {args.streams} closed-loop streams of {args.tokens} tokens, "
        f"{args.seconds:g} s; step = {args.step_time} s x batch^{args.batch_exponent}, "
        f"one device (steps serialise), {args.model_mb} MB per model copy\n"
    )
    print("| engines | tokens/s | TTFT p50 | TTFT p99 | mean batch | model processes | model RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, r in sides.items():
        print(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['ttft_p50_ms']:.0f} ms "
            f"| {r['ttft_p99_ms']:.0f} ms | {r['mean_batch']:.1f} | {r['model_processes']} "
            f"| {r['model_rss_mb']:.0f} MB |"
        )
    a, b = sides["per-worker"], sides["shared"]
    print(
        f"\nshared / per-worker: {b['tokens_per_s'] / a['tokens_per_s']:.2f}x tokens/s, "
        f"{b['model_rss_mb'] / a['model_rss_mb']:.2f}x model memory; "
        f"errors {a['errors']} / {b['errors']}"
    )
    hop = hop_cost()
    print(
        f"per token, one stream, zero-cost steps: local engine {hop['local_us']:.0f} us, "
        f"through the socket {hop['hop_us']:.0f} us (+{hop['hop_us'] - hop['local_us']:.0f} us"
        f" = {100 * (hop['hop_us'] - hop['local_us']) / (args.step_time * 1e6):.2f}% of one "
        f"{args.step_time * 1000:g} ms step)"
    )


if __name__ == "__main__":
    main()
