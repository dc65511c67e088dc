"""One engine per host against one engine per worker: same 4 workers, same load.

Both sides serve the same Flask app (``to_asgi``) in 4 uvicorn worker processes; only
where the model lives differs. By default each worker is a uvicorn of its own and client
``i`` talks to worker ``i % 4``, as a round-robin balancer spreads users, so both sides
get the same even load; ``--spread kernel`` runs one ``uvicorn --workers 4`` instead,
whose workers take connections from one shared socket as the kernel hands them out
(unevenly: a burst of connections mostly lands on one worker).

*per-worker*: each worker builds its own engine (no socket configured). *shared*: the
workers' ``shared_engine(make_engine)`` connects to ``python -m llmbridge serve`` on a
Unix socket. Two backends, each side by side:

- ``simulated``: a :class:`SimulatedGenerator` that stands for a model on one GPU. Every
  copy holds ``--model-mb`` of touched memory (its "weights"), and every step holds an
  ``fcntl`` lock on one file for its whole duration, so the per-worker copies' steps
  serialise as N model copies on one device do. A step costs
  ``step_time * batch ** batch_exponent`` (sub-linear: decoding is memory-bound, a larger
  batch costs little more per step).
- ``transformers`` (when torch and transformers are installed): a randomly initialised
  GPT-2 (``--hf-layers`` x ``--hf-width``, no download) on the CPU: real contention, the
  per-worker copies compete for the same cores.

The load is closed-loop: ``--streams`` clients, each streaming one request after another,
each asking for a length drawn from [tokens/2, 3*tokens/2] (seeded; real answers differ
in length, so the streams don't finish in lockstep). Each client keeps its connection
alive (as a client pool, or a proxy with upstream keep-alive, does), so it stays with the
worker that accepted it; ``--new-connections`` opens one per request instead (a proxy
without upstream keep-alive, nginx's default), and the kernel then spreads them over the
workers unevenly (the per-worker engines' batches are printed). After ``--warmup``
seconds, ``--seconds`` of steady state are measured: tokens/s and mean batch from every
model-holding process's own step log (every step appends its time, batch size and
tokens), p50/p99 time to first token of the requests begun in the window, total RSS of
the model-holding processes, and the CPU the servers (workers and engine process) spent
per token. Then the CPU per chunk of the process hop against a local engine.

Run: python benchmarks/shared_engine.py [--backend both] [--streams 64] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import random
import resource
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


def _log_steps(generator: Any) -> None:
    """Append ``time batch tokens`` to this process's step log after every step."""
    log = open(os.path.join(os.environ["BENCH_DIR"], f"steps-{os.getpid()}.log"), "a")  # noqa: SIM115
    iterate = generator.iterate

    def logged() -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = iterate()
        tokens = sum(len(r.get("token_ids") or ()) for r in results)
        if results:
            log.write(f"{time.time():.6f} {len(results)} {tokens}\n")
            log.flush()
        return results

    generator.iterate = logged


def _simulated_generator() -> Any:
    from llmbridge.testing import SimulatedGenerator

    class DeviceGenerator(SimulatedGenerator):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            self.weights = bytearray(int(os.environ.get("BENCH_MODEL_MB", "200")) << 20)
            for i in range(0, len(self.weights), 4096):
                self.weights[i] = 1  # touch every page: resident, like loaded weights
            self.lock = open(os.environ["BENCH_DEVICE_LOCK"], "a")  # noqa: SIM115

        def iterate(self) -> list[dict[str, Any]]:
            fcntl.flock(self.lock, fcntl.LOCK_EX)  # one device: one step at a time
            try:
                return super().iterate()
            finally:
                fcntl.flock(self.lock, fcntl.LOCK_UN)

    return DeviceGenerator(
        step_time=float(os.environ.get("BENCH_STEP", "0.1")),
        batch_exponent=float(os.environ.get("BENCH_EXPONENT", "0.25")),
    )


def _transformers_generator() -> Any:
    from transformers_batching import build  # the same random-weight GPT-2, no download

    from llmbridge.backends import TransformersGenerator

    width = int(os.environ.get("BENCH_HF_WIDTH", "256"))
    model, tokenizer = build(int(os.environ.get("BENCH_HF_LAYERS", "4")), width)
    return TransformersGenerator(model, tokenizer, max_new_tokens=512)


def make_engine() -> Any:
    """The engine over the chosen backend (what holds the model); logs every step."""
    from llmbridge import Engine
    from llmbridge.backends import StepBackend

    kind = os.environ.get("BENCH_BACKEND", "simulated")
    generator = _simulated_generator() if kind == "simulated" else _transformers_generator()
    _log_steps(generator)
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


def _env(folder: Path, args: argparse.Namespace, backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LLMBRIDGE_ENGINE_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE)])
    env.update(
        BENCH_BACKEND=backend,
        BENCH_DIR=str(folder),
        BENCH_DEVICE_LOCK=str(folder / "device.lock"),
        BENCH_MODEL_MB=str(args.model_mb),
        BENCH_STEP=str(args.step_time),
        BENCH_EXPONENT=str(args.batch_exponent),
        BENCH_HF_LAYERS=str(args.hf_layers),
        BENCH_HF_WIDTH=str(args.hf_width),
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


async def _load(
    urls: list[str],
    streams: int,
    warmup: float,
    seconds: float,
    tokens: int,
    keep_alive: bool,
    servers: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Closed-loop load; returns the window's wall-clock bounds, client figures and the
    CPU seconds the ``servers`` process trees spent in the window."""
    import httpx
    from _proctree import cpu_seconds

    ttfts: list[float] = []
    completed = errors = 0
    began_at = time.monotonic()
    w0, w1 = began_at + warmup, began_at + warmup + seconds
    pool = streams + 8
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool if keep_alive else 0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal completed, errors
            rng = random.Random(i)
            n = 0
            while time.monotonic() < w1:
                length = rng.randint(max(1, tokens // 2), max(1, tokens * 3 // 2))
                params = {"p": f"c{i}-{n}", "n": length}
                n += 1
                began = time.monotonic()
                first = None
                url = f"{urls[i % len(urls)]}/sse"  # client i always goes to server i % n
                async with client.stream("GET", url, params=params) as r:
                    if r.status_code != 200:
                        errors += 1
                        await r.aread()
                        continue
                    async for line in r.aiter_lines():
                        if first is None and line.startswith("data:"):
                            first = time.monotonic() - began
                            if w0 <= began < w1:
                                ttfts.append(first)
                        if line.startswith("event: done"):
                            completed += 1
                        elif line.startswith("event: error"):
                            errors += 1
                        if time.monotonic() >= w1:
                            break  # past the window: leave (the request is cancelled)

        async def account() -> float:
            await asyncio.sleep(max(0.0, w0 - time.monotonic()))
            before = cpu_seconds(*servers)
            await asyncio.sleep(max(0.0, w1 - time.monotonic()))
            return cpu_seconds(*servers) - before

        cpu, *_ = await asyncio.gather(account(), *(one(i) for i in range(streams)))
    ttfts.sort()
    now_wall, now_mono = time.time(), time.monotonic()
    return {
        "window": (now_wall - (now_mono - w0), now_wall - (now_mono - w1)),
        "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
        if ttfts
        else float("nan"),
        "completed": completed,
        "errors": errors,
        "cpu_s": cpu,
    }


def _steps_in(folder: Path, window: tuple[float, float]) -> dict[str, float]:
    """Tokens/s and mean batch over the window, from every model process's step log."""
    steps = jobs = tokens = 0
    each = []  # mean batch of each model process: how evenly the load spread
    for log in folder.glob("steps-*.log"):
        mine = [0, 0]
        for line in log.read_text().splitlines():
            at, batch, produced = line.split()
            if window[0] <= float(at) < window[1]:
                mine[0] += 1
                mine[1] += int(batch)
                tokens += int(produced)
        steps += mine[0]
        jobs += mine[1]
        if mine[0]:
            each.append(mine[1] / mine[0])
    return {
        "tokens_per_s": tokens / (window[1] - window[0]),
        "mean_batch": jobs / steps if steps else float("nan"),
        "batch_each": sorted(each, reverse=True),
        "steps": steps,
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


def run_side(backend: str, shared: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration: start it, warm it, load it, measure it, stop it."""
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        folder = Path(tmp)
        env = _env(folder, args, backend)
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
                wait_ready(sock, timeout=120, proc=engine)
                env["LLMBRIDGE_ENGINE_SOCKET"] = sock
            # ``even``: one single-worker uvicorn per port, client i on port i % n (as a
            # round-robin balancer spreads them); ``kernel``: one ``uvicorn --workers n``
            # whose shared socket the kernel hands connections from (unevenly).
            servers = 1 if args.spread == "kernel" else args.workers
            per_server = args.workers if args.spread == "kernel" else 1
            urls = []
            for _ in range(servers):
                port = _free_port()
                procs.append(
                    subprocess.Popen(
                        [*UVICORN, "--workers", str(per_server), "--port", str(port)],
                        env=env,
                        cwd=str(HERE),
                    )
                )
                urls.append(f"http://127.0.0.1:{port}")
            for url in urls:
                _wait_port(int(url.rsplit(":", 1)[1]), 120)
            # Warm every worker (imports, and a per-worker engine builds its model).
            asyncio.run(_load(urls, args.workers * 4, 0.0, 2.0, 4, False))
            load = (args.streams, args.warmup, args.seconds, args.tokens, not args.new_connections)
            result = asyncio.run(_load(urls, *load, tuple(p.pid for p in procs)))
            holders = [int(p.name.split("-")[1]) for p in folder.glob("model-*")]
            result["model_processes"] = len(holders)
            result["model_rss_mb"] = sum(_rss_mb(pid) for pid in holders)
            result.update(_steps_in(folder, result["window"]))
            tokens = result["tokens_per_s"] * args.seconds
            result["cpu_us_per_token"] = 1e6 * result["cpu_s"] / tokens if tokens else float("nan")
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


def hop_cost(streams: int = 64, tokens: int = 200, step: float = 0.005) -> dict[str, float]:
    """CPU per chunk of ``streams`` streams read by coroutines: a local engine against the
    same engine behind the socket (this process plus the engine process). Steps cost a
    fixed ``step`` (no CPU: a sleep), long enough that every token is a chunk of its own.
    """
    from _proctree import cpu_seconds

    from llmbridge import Engine
    from llmbridge._host.process import wait_ready
    from llmbridge.backends import StepBackend
    from llmbridge.gunicorn import EngineClient
    from llmbridge.testing import SimulatedGenerator

    def measure(engine: Any, others: tuple[int, ...] = ()) -> dict[str, float]:
        async def read(i: int) -> int:
            chunks = 0
            async for _ in engine.submit(f"hop {i}", max_new_tokens=tokens):
                chunks += 1
            return chunks

        async def run() -> int:
            return sum(await asyncio.gather(*(read(i) for i in range(streams))))

        asyncio.run(run())  # warm: connections, imports
        before = _self_cpu() + cpu_seconds(*others)
        began = time.perf_counter()
        chunks = asyncio.run(run())
        wall = time.perf_counter() - began
        cpu = _self_cpu() + cpu_seconds(*others) - before
        return {"cpu_us": 1e6 * cpu / chunks, "chunks": chunks, "wall_s": wall}

    def generator() -> SimulatedGenerator:
        return SimulatedGenerator(step_time=step, batch_exponent=0.0, max_new_tokens=tokens)

    gen = generator()
    with Engine(StepBackend(gen, gen.make_job, max_batch_size=256)) as local:
        local_figures = measure(local)
    with tempfile.TemporaryDirectory(prefix="bench-hop-") as tmp:
        sock = os.path.join(tmp, "engine.sock")
        code = (
            "from llmbridge import Engine\n"
            "from llmbridge.backends import StepBackend\n"
            "from llmbridge.testing import SimulatedGenerator\n"
            f"gen = SimulatedGenerator(step_time={step}, batch_exponent=0.0, "
            f"max_new_tokens={tokens})\n"
            "engine = Engine(StepBackend(gen, gen.make_job, max_batch_size=256))\n"
        )
        Path(tmp, "hop_target.py").write_text(code)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), tmp]))
        proc = subprocess.Popen(
            [*SERVE, "hop_target:engine", "--socket", sock, "--no-restart"], env=env, cwd=tmp
        )
        try:
            wait_ready(sock, timeout=60, proc=proc)
            client = EngineClient(sock)
            try:
                hop_figures = measure(client, (proc.pid,))
            finally:
                client.close(5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return {
        "local_us": local_figures["cpu_us"],
        "hop_us": hop_figures["cpu_us"],
        "local_chunks": local_figures["chunks"],
        "hop_chunks": hop_figures["chunks"],
        "local_wall": local_figures["wall_s"],
        "hop_wall": hop_figures["wall_s"],
    }


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the repeats (errors summed)."""
    out = dict(runs[0])
    figures = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "mean_batch", "model_rss_mb")
    for key in (*figures, "cpu_us_per_token"):
        out[key] = statistics.median(r[key] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def _has_transformers() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["simulated", "transformers", "both"], default="both")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=32, help="mean tokens per answer")
    parser.add_argument(
        "--spread",
        choices=["even", "kernel"],
        default="even",
        help="even: a uvicorn per worker, clients spread round-robin; kernel: uvicorn "
        "--workers N on one socket",
    )
    parser.add_argument(
        "--new-connections", action="store_true", help="a new connection for every request"
    )
    parser.add_argument("--model-mb", type=int, default=200)
    parser.add_argument("--step-time", type=float, default=0.1)
    parser.add_argument("--batch-exponent", type=float, default=0.25)
    parser.add_argument("--hf-layers", type=int, default=4)
    parser.add_argument("--hf-width", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="runs per side, interleaved")
    parser.add_argument("--no-hop", action="store_true", help="skip the per-chunk hop cost")
    args = parser.parse_args()
    backends = ["simulated", "transformers"] if args.backend == "both" else [args.backend]
    if "transformers" in backends and not _has_transformers():
        if args.backend == "transformers":
            sys.exit("the transformers rows need torch and transformers installed")
        backends.remove("transformers")
        print("(transformers rows not run: torch or transformers is not installed)")
    print(
        f"{args.workers} workers, {args.streams} closed-loop streams of ~{args.tokens} tokens, "
        f"{'a connection per request' if args.new_connections else 'kept-alive connections'}, "
        f"{'spread evenly' if args.spread == 'even' else 'spread by the kernel'}; "
        f"{args.seconds:g} s measured after {args.warmup:g} s, medians of {args.repeat} "
        f"interleaved runs; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(
        f"simulated: step = {args.step_time} s x batch^{args.batch_exponent}, one device "
        f"(steps serialise), {args.model_mb} MB per model copy; transformers: GPT-2 "
        f"{args.hf_layers} layers x {args.hf_width}, random weights, CPU\n"
    )
    print(
        "| backend | engines | tokens/s | TTFT p50 | TTFT p99 | mean batch | model processes "
        "| model RSS | server CPU per token | errors |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for backend in backends:
        runs: dict[str, list[dict[str, Any]]] = {"one per worker": [], "one shared": []}
        for _ in range(args.repeat):  # interleaved: drift in the machine's load hits both
            for name in runs:
                runs[name].append(run_side(backend, name == "one shared", args))
        sides = {name: _median_run(rs) for name, rs in runs.items()}
        for name, r in sides.items():
            print(
                f"| {backend} | {name} | {r['tokens_per_s']:.0f} | {r['ttft_p50_ms']:.0f} ms "
                f"| {r['ttft_p99_ms']:.0f} ms | {r['mean_batch']:.1f} | {r['model_processes']} "
                f"| {r['model_rss_mb']:.0f} MB | {r['cpu_us_per_token']:.0f} us "
                f"| {r['errors']} |",
                flush=True,
            )
        a, b = sides["one per worker"], sides["one shared"]
        each = "; ".join(
            ", ".join(f"{x:.1f}" for x in r["batch_each"]) for r in runs["one per worker"]
        )
        per_run = ", ".join(
            f"{s['tokens_per_s'] / p['tokens_per_s']:.2f}x"
            for p, s in zip(runs["one per worker"], runs["one shared"], strict=True)
        )
        ratios.append(f"{backend}: the per-worker engines' mean batches, run by run: {each}")
        ratios.append(
            f"{backend}: shared / per-worker {b['tokens_per_s'] / a['tokens_per_s']:.2f}x "
            f"tokens/s (medians; run by run {per_run}), "
            f"{b['model_rss_mb'] / a['model_rss_mb']:.2f}x model memory"
        )
    print()
    for line in ratios:
        print(line)
    if not args.no_hop:
        hop = hop_cost()
        print(
            f"CPU per chunk, 64 streams read by coroutines, 5 ms steps: local engine "
            f"{hop['local_us']:.1f} us ({hop['local_chunks']:.0f} chunks, "
            f"{hop['local_wall']:.2f} s), through the socket {hop['hop_us']:.1f} us "
            f"({hop['hop_chunks']:.0f} chunks, {hop['hop_wall']:.2f} s): "
            f"+{hop['hop_us'] - hop['local_us']:.1f} us a chunk, "
            f"{100 * (hop['hop_us'] - hop['local_us']) / (1e6 * args.step_time):.3f}% of one "
            f"{1000 * args.step_time:g} ms step"
        )


if __name__ == "__main__":
    main()
