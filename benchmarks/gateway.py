"""llmbridge's ``/v1`` gateways against LiteLLM's proxy, on one fake upstream.

One fake OpenAI upstream (raw asyncio, for low overhead: 20 ms to the first token, 20
tokens 10 ms apart; a non-streamed answer after 20 ms) and, in front of it, side by side:

- ``direct``: the upstream called directly (the baseline the others are measured over);
- ``quart``: llmbridge's Quart ``/v1`` blueprint over ``OpenAIBackend``, under uvicorn;
- ``flask``: llmbridge's Flask ``/v1`` blueprint under ``llmbridge.asgi.to_asgi``, under
  uvicorn;
- ``litellm``: LiteLLM's proxy (its FastAPI app under uvicorn), when ``--litellm-python``
  names an interpreter that has ``litellm`` (a separate venv: it's no dependency of ours).

Every server listens on 127.0.0.1 and runs uvloop + h11 (uvicorn ``--loop uvloop --http
h11``; plain asyncio where uvloop is missing, and the table says so). Scenarios: 1, 64
and 256 concurrent streams, and 64 concurrent non-streamed requests, each a bounded
number of requests (``SCENARIOS``: 100 in turn for 1 stream, so its p99 is not just the
slowest request), from one aiohttp client in this process; the targets' order rotates
over ``--repeats`` repeats (``--only`` picks scenarios). Reported per scenario and target, over all
repeats: added time to first chunk and total (p50 and p99 of the target minus those of
``direct`` in the same repeat, then the median over repeats), requests/s, the CPU
seconds per 1,000 requests of the target's process tree (utime + stime from
``/proc/<pid>/stat``, children included) and its peak RSS (sum of ``VmHWM``). Below the
table: what each server burns idle (10 s before the load).

    python benchmarks/gateway.py --litellm-python /work/venv-litellm/bin/python
    python benchmarks/gateway.py                     # without LiteLLM
    python benchmarks/gateway.py --only "64 non-streamed" --connections-per-pool 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _proctree import cpu_seconds, peak_rss_mb  # noqa: E402

from support import free_port, wait_for_port  # noqa: E402

FIRST_TOKEN = 0.020
TOKENS = 20
TOKEN_GAP = 0.010
WHOLE = 0.020
MODEL = "sim"
#: Seconds every server is left idle before the load, to measure what idling costs it.
IDLE_SECONDS = 10.0
#: (name, concurrency, streamed, rounds): each of ``concurrency`` clients sends ``rounds``
#: requests one after another.
SCENARIOS = [
    ("1 stream", 1, True, 100),
    ("64 streams", 64, True, 2),
    ("256 streams", 256, True, 1),
    ("64 non-streamed", 64, False, 4),
]


# -- the fake upstream (run with --serve-upstream PORT) --------------------------------


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict[str, Any]) -> bytes:
    return _chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


async def _upstream_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            chat = path.endswith("/chat/completions")
            created = int(time.time())
            if not body.get("stream"):
                await asyncio.sleep(WHOLE)
                text = "".join(f" t{i}" for i in range(TOKENS))
                choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                answer = json.dumps(
                    {
                        "id": "cmpl-1",
                        "object": "chat.completion" if chat else "text_completion",
                        "created": created,
                        "model": MODEL,
                        "choices": [choice],
                        "usage": {
                            "prompt_tokens": 5,
                            "completion_tokens": TOKENS,
                            "total_tokens": TOKENS + 5,
                        },
                    }
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
                continue
            await asyncio.sleep(FIRST_TOKEN)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            base = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": MODEL,
            }
            for i in range(TOKENS):
                if i:
                    await asyncio.sleep(TOKEN_GAP)
                last = i == TOKENS - 1
                piece: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
                if chat:
                    piece["delta"] = {"content": f" t{i}"}
                    if i == 0:
                        piece["delta"]["role"] = "assistant"
                else:
                    piece["text"] = f" t{i}"
                writer.write(_event({**base, "choices": [piece]}))
                await writer.drain()
            usage = {"prompt_tokens": 5, "completion_tokens": TOKENS, "total_tokens": TOKENS + 5}
            writer.write(_event({**base, "choices": [], "usage": usage}))
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve_upstream(port: int) -> None:
    """Run the fake upstream on 127.0.0.1:``port`` until killed (blocks)."""

    async def main() -> None:
        server = await asyncio.start_server(_upstream_connection, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    _run_loop(main())


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- the gateways (imported by uvicorn in their own processes) -------------------------


def _engine() -> Any:
    from llmbridge import Engine
    from llmbridge.backends import OpenAIBackend

    upstream = os.environ["GATEWAY_UPSTREAM"]
    # Room for the largest scenario (256 streams) and more: the connections are sized
    # from max_concurrency by default.
    backend = OpenAIBackend(
        upstream,
        model=MODEL,
        stream=os.environ.get("GATEWAY_BACKEND_STREAM", "1") == "1",
        max_concurrency=1024,
    )
    return Engine(backend, max_queued=4096)


def _settings() -> Any:
    from llmbridge.openai import Settings

    return Settings(models=(MODEL,))


def __getattr__(name: str) -> Any:
    # The apps, built only in the server process that imports them. No API keys
    # (auth=None), as LiteLLM's proxy runs here without a master key.
    if name == "quart_app":
        from quart import Quart

        from llmbridge.openai import quart_blueprint

        qapp = Quart(__name__)
        qapp.register_blueprint(quart_blueprint(_engine(), settings=_settings(), auth=None))
        return qapp
    if name == "flask_asgi":
        from flask import Flask

        from llmbridge.asgi import to_asgi
        from llmbridge.openai import flask_blueprint

        app = Flask(__name__)
        app.register_blueprint(flask_blueprint(_engine(), settings=_settings(), auth=None))
        return to_asgi(app)
    raise AttributeError(name)


# -- the load ---------------------------------------------------------------------------


@dataclass
class Sample:
    """One scenario run against one target."""

    firsts: list[float] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0
    errors: int = 0


def pct(values: list[float], q: int) -> float:
    """The ``q``-th percentile (inclusive method; the median for ``q=50``)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def load(url: str, concurrency: int, streamed: bool, rounds: int) -> Sample:
    """``concurrency`` clients, each sending ``rounds`` chat requests in turn."""
    import aiohttp

    sample = Sample()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": TOKENS,
        "stream": streamed,
    }
    headers = {"Authorization": "Bearer sk-bench"}

    async def one(session: aiohttp.ClientSession) -> None:
        start = time.perf_counter()
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                await response.read()
                sample.errors += 1
                return
            if not streamed:
                data = await response.json()
                if not data["choices"][0]["message"]["content"]:
                    sample.errors += 1
                now = time.perf_counter() - start
                sample.firsts.append(now)
                sample.totals.append(now)
                return
            first = None
            async for line in response.content:
                if first is None and line.startswith(b"data: {") and b'"content":" t' in line:
                    first = time.perf_counter() - start
        if first is None:
            sample.errors += 1
            return
        sample.firsts.append(first)
        sample.totals.append(time.perf_counter() - start)

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(rounds):
            await one(session)

    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers
    ) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        sample.wall = time.perf_counter() - start
    return sample


# -- servers ------------------------------------------------------------------------------


def _proc(name: str) -> str:
    """The process a target's CPU is read from (``direct``: the fake upstream)."""
    return "upstream" if name == "direct" else name


def _uvicorn(python: str, target: str, port: int, uvloop_ok: bool) -> list[str]:
    argv = [python, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--http", "h11", "--loop", "uvloop" if uvloop_ok else "asyncio"]
    return [*argv, "--no-access-log", "--log-level", "warning", "--backlog", "4096"]


def _has(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", code], check=False).returncode == 0


def _litellm_config(directory: Path, upstream: str) -> Path:
    config = directory / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream}\n"
        "      api_key: sk-upstream\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
    )
    return config


def _warm(url: str) -> None:
    _run_loop(load(url, 4, True, 2))
    _run_loop(load(url, 4, False, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--litellm-python", help="an interpreter with litellm installed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="scenario names to run (default: all)")
    parser.add_argument(
        "--backend-whole",
        action="store_true",
        help="OpenAIBackend(stream=False): whole upstream answers (for non-streamed runs)",
    )
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return

    me = sys.executable
    uvloop_ok = _has(me, "uvloop")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    env["GATEWAY_UPSTREAM"] = upstream
    env["GATEWAY_BACKEND_STREAM"] = "0" if args.backend_whole else "1"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls = {"direct": f"http://127.0.0.1:{up_port}"}
    scratch = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    try:
        procs["upstream"] = subprocess.Popen(
            [me, __file__, "--serve-upstream", str(up_port)], env=env
        )
        wait_for_port(up_port, proc=procs["upstream"])
        for name, target in (("quart", "gateway:quart_app"), ("flask", "gateway:flask_asgi")):
            port = free_port()
            procs[name] = subprocess.Popen(
                _uvicorn(me, target, port, uvloop_ok), env=env, cwd=ROOT / "benchmarks"
            )
            urls[name] = f"http://127.0.0.1:{port}"
            wait_for_port(port, proc=procs[name])
        litellm_note = "not run: no --litellm-python given"
        if args.litellm_python:
            lite_uvloop = _has(args.litellm_python, "uvloop")
            port = free_port()
            lenv = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
            lenv.update(
                CONFIG_FILE_PATH=str(_litellm_config(scratch, upstream)),
                LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
                LITELLM_TELEMETRY_DISABLED="true",
                LITELLM_LOG="ERROR",
                DISABLE_SCHEMA_UPDATE="true",
                LITELLM_LOCAL_MODEL_COST_MAP="True",
            )
            procs["litellm"] = subprocess.Popen(
                _uvicorn(args.litellm_python, "litellm.proxy.proxy_server:app", port, lite_uvloop),
                env=lenv,
                cwd=scratch,
            )
            urls["litellm"] = f"http://127.0.0.1:{port}"
            wait_for_port(port, timeout=180, proc=procs["litellm"])
            litellm_note = f"litellm under uvicorn, loop {'uvloop' if lite_uvloop else 'asyncio'}"
        for url in urls.values():
            _warm(url)
        # What each server spends doing nothing (timers, its loop's tick): part of every
        # CPU figure, and most of it at one stream.
        idle_before = {name: cpu_seconds(procs[_proc(name)].pid) for name in urls}
        time.sleep(IDLE_SECONDS)
        idle = {
            name: (cpu_seconds(procs[_proc(name)].pid) - idle_before[name]) / IDLE_SECONDS
            for name in urls
        }

        targets = list(urls)
        scenarios = [s for s in SCENARIOS if not args.only or s[0] in args.only]
        results: dict[tuple[str, str], list[Sample]] = {}
        for scenario, concurrency, streamed, rounds in scenarios:
            for repeat in range(args.repeats):
                order = targets[repeat % len(targets) :] + targets[: repeat % len(targets)]
                for name in order:
                    pid = procs["upstream" if name == "direct" else name].pid
                    before = cpu_seconds(pid)
                    sample = _run_loop(load(urls[name], concurrency, streamed, rounds))
                    sample.cpu = cpu_seconds(pid) - before
                    results.setdefault((scenario, name), []).append(sample)
                    print(
                        f"  {scenario:16} repeat {repeat + 1} {name:8} {sample.wall:6.2f} s"
                        f" errors {sample.errors}",
                        file=sys.stderr,
                        flush=True,
                    )
        rss = {
            name: peak_rss_mb(procs["upstream" if name == "direct" else name].pid) for name in urls
        }
        report(results, scenarios, targets, rss)
        loop_name = "uvloop" if uvloop_ok else "asyncio (uvloop missing)"
        print(f"\nservers: uvicorn --http h11 --loop {loop_name}; {litellm_note}")
        print("direct's CPU and RSS are the fake upstream's own.")
        print(
            f"idle CPU over {IDLE_SECONDS:g} s before the load, % of a core: "
            + ", ".join(f"{name} {100 * share:.1f}" for name, share in idle.items())
        )
        backend = "stream=False" if args.backend_whole else "stream=True (the default)"
        print(f"llmbridge gateways: OpenAIBackend({backend}, max_concurrency=1024)")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def report(
    results: dict[tuple[str, str], list[Sample]],
    scenarios: list[tuple[str, int, bool, int]],
    targets: list[str],
    rss: dict[str, float],
) -> None:
    """Print one row per scenario and target (added latencies: median over repeats)."""
    header = (
        f"{'scenario':16} {'target':8} {'+first p50':>11} {'p99':>11} {'+total p50':>11} "
        f"{'p99':>11} {'req/s':>7} {'CPU s/1k':>8} {'RSS MB':>7} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for scenario, *_ in scenarios:
        direct = results[(scenario, "direct")]
        for name in targets:
            samples = results[(scenario, name)]

            def added(
                metric: str, q: int, samples: list[Sample] = samples, direct: list[Sample] = direct
            ) -> float:
                return statistics.median(
                    pct(getattr(s, metric), q) - pct(getattr(d, metric), q)
                    for s, d in zip(samples, direct, strict=True)
                )

            requests = sum(len(s.totals) + s.errors for s in samples)
            rate = statistics.median(len(s.totals) / s.wall for s in samples)
            cpu = 1000 * sum(s.cpu for s in samples) / requests
            errors = sum(s.errors for s in samples)
            if name == "direct":
                first = 1000 * statistics.median(pct(s.firsts, 50) for s in samples)
                total = 1000 * statistics.median(pct(s.totals, 50) for s in samples)
                print(
                    f"{scenario:16} {name:8} {first:9.1f}ms {'':>11} {total:9.1f}ms "
                    f"{'':>11} {rate:7.1f} {cpu:8.2f} {rss[name]:7.0f} {errors:6}"
                )
                continue
            print(
                f"{scenario:16} {name:8} {1000 * added('firsts', 50):+9.1f}ms "
                f"{1000 * added('firsts', 99):+9.1f}ms {1000 * added('totals', 50):+9.1f}ms "
                f"{1000 * added('totals', 99):+9.1f}ms {rate:7.1f} {cpu:8.2f} "
                f"{rss[name]:7.0f} {errors:6}"
            )


if __name__ == "__main__":
    main()
