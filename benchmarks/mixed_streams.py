"""Mixed streams: 32 concurrent streams through one non-thread-safe step generator.

Scenario 3 of issue 3, side by side in one run under ``gunicorn -k gthread --threads 32``
(one worker). ``direct``: each Flask request thread drives the shared
``SimulatedGenerator`` itself (enqueue, then ``iterate()`` until its job ends), the
way apps call ExLlamaV2's ``DynamicGenerator`` today. ``bridge``: the same generator
owned by an engine, each request reading its own stream through ``FlaskBridge``. Every
stream is checked against the exact text its prompt must produce.

    python benchmarks/mixed_streams.py           # ~10 s
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from flask import Flask, Response, request

from llmbridge import Engine, Request
from llmbridge.backends import StepBackend
from llmbridge.flask import FlaskBridge
from llmbridge.testing import SimulatedGenerator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEP_TIME = 0.002


def create_app() -> Flask:
    """``/direct`` drives a shared generator from request threads; ``/bridge`` goes
    through an engine that owns another one."""
    app = Flask(__name__)
    shared = SimulatedGenerator(step_time=STEP_TIME)
    owned = SimulatedGenerator(step_time=STEP_TIME)
    bridge = FlaskBridge(app, engine=Engine(StepBackend(owned, owned.make_job)))
    ids = itertools.count()

    @app.get("/direct")
    def direct() -> Response:
        params = {"max_new_tokens": int(request.args["n"])}
        job = shared.make_job(Request(f"direct-{next(ids)}", request.args["prompt"], params))

        def generate() -> Iterator[str]:
            shared.enqueue(job)
            while True:
                for result in shared.iterate():
                    if result["identifier"] == job.identifier:
                        yield result.get("text", "")
                        if result.get("eos"):
                            return

        return Response(generate(), mimetype="text/plain")

    @app.get("/bridge")
    def through_bridge() -> Response:
        n = int(request.args["n"])
        return bridge.stream_response(request.args["prompt"], max_new_tokens=n)

    return app


def run(url: str, route: str, streams: int, tokens: int) -> dict[str, int]:
    """``streams`` concurrent requests; count exact, corrupted and crashed streams."""
    import anyio
    import httpx

    expected = SimulatedGenerator()
    counts = {"exact": 0, "corrupted": 0, "crashed": 0}

    async def one(client: httpx.AsyncClient, n: int) -> None:
        prompt = f"stream {n} of {route}"
        try:
            params = {"prompt": prompt, "n": tokens}
            reply = await client.get(f"{url}/{route}", params=params)
            if reply.status_code != 200:
                counts["crashed"] += 1
            elif reply.text == expected.expected_text(prompt, tokens):
                counts["exact"] += 1
            else:
                counts["corrupted"] += 1
        except httpx.HTTPError:
            counts["crashed"] += 1  # the server broke the response off

    async def main() -> None:
        limits = httpx.Limits(max_connections=streams)
        async with (
            httpx.AsyncClient(timeout=30, limits=limits) as client,
            anyio.create_task_group() as tg,
        ):
            for n in range(streams):
                tg.start_soon(one, client, n)

    anyio.run(main)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "32", "-w", "1"]
    cmd += ["-b", f"127.0.0.1:{port}", "mixed_streams:create_app()"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"{url}/bridge", params={"prompt": "up", "n": 1}, timeout=2)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.1)
            totals = {}
            for route in ("direct", "bridge"):
                total = {"exact": 0, "corrupted": 0, "crashed": 0}
                for _ in range(args.rounds):
                    for key, value in run(url, route, args.streams, args.tokens).items():
                        total[key] += value
                totals[route] = total
        finally:
            proc.terminate()
            proc.wait(30)
    n = args.streams * args.rounds
    print(
        f"\n{args.rounds} rounds of {args.streams} concurrent streams x {args.tokens} tokens, "
        f"gunicorn gthread (32 threads), one shared SimulatedGenerator\n"
    )
    print(f"{'route':<10}{'streams':>9}{'exact':>8}{'corrupted':>11}{'crashed':>9}")
    for route, total in totals.items():
        print(f"{route:<10}{n:>9}{total['exact']:>8}{total['corrupted']:>11}{total['crashed']:>9}")


def free_port() -> int:
    """A free port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
