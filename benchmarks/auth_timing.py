"""Does a wrong API key's timing tell how close it was? Near misses against far misses.

Kinds of presented key, against a configured key ``K`` (among a few others):

- ``valid``: ``K`` itself;
- ``near miss``: ``K`` with only its last character changed (same length);
- ``far miss``: a key of ``K``'s length that differs from the first character on;
- ``shorter`` / ``longer``: 8 characters, and ``K`` with 40 more.

Method. In process, ``ApiKeys.lookup`` runs ``--calls`` times per kind in each of
``--rounds`` rounds, the kinds interleaved within every round so that a change in the
machine's speed hits all kinds alike; the table gives the mean and median ns per lookup
over the rounds and their spread (stdev); the median resists a round that another
process slowed down. As a positive control, the same for a character loop
that stops at the first difference: its near misses must come out slower, or the method
could not see a leak. Over HTTP, a real server (gunicorn gthread
serving ``GET /v1/models`` behind the keys) gets ``--requests`` requests per kind, again
interleaved, on one keep-alive connection; the table gives the mean and median latency.
A near/far difference well inside the spread means the comparison does not leak the
prefix. Wall-clock figures, so a benchmark and never a test assertion.

    python benchmarks/auth_timing.py
    python benchmarks/auth_timing.py --rounds 40 --calls 50000 --requests 3000
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from llmbridge.openai import ApiKeys  # noqa: E402

from support import PYTHON, free_port, run_server  # noqa: E402

KEY = "sk-" + secrets.token_urlsafe(36)


def kinds() -> dict[str, str]:
    """The presented keys, by kind."""
    last = "A" if KEY[-1] != "A" else "B"
    far = "".join("Z" if c != "Z" else "Y" for c in KEY)
    return {
        "valid": KEY,
        "near miss": KEY[:-1] + last,
        "far miss": far,
        "shorter": KEY[:8],
        "longer": KEY + "x" * 40,
    }


def _round_means(
    check: Callable[[str], object], presented: dict[str, str], rounds: int, calls: int
) -> dict[str, list[float]]:
    means: dict[str, list[float]] = {name: [] for name in presented}
    loop = range(calls)
    for _ in range(rounds):
        for name, key in presented.items():
            start = time.perf_counter_ns()
            for _ in loop:
                check(key)
            means[name].append((time.perf_counter_ns() - start) / calls)
    return means


def _early_exit_equal(presented: str) -> bool:
    # The positive control: a comparison that stops at the first difference, as a
    # hand-written check would. Its near misses must come out measurably slower, or
    # the method could not see a leak at all.
    if len(presented) != len(KEY):
        return False
    for a, b in zip(presented, KEY, strict=True):  # noqa: SIM110 - the loop is the point
        if a != b:
            return False
    return True


def in_process(rounds: int, calls: int) -> None:
    """The comparison itself: ApiKeys.lookup, and an early-exit compare as a control."""
    keys = ApiKeys([KEY, "sk-" + secrets.token_urlsafe(36), "sk-" + secrets.token_urlsafe(20)])
    presented = kinds()
    for label, check in (
        ("ApiKeys.lookup (3 keys)", keys.lookup),
        ("early-exit compare (control)", _early_exit_equal),
    ):
        means = _round_means(check, presented, rounds, calls)
        print(f"\nin process: {label}, {rounds} rounds x {calls} calls per kind")
        print(f"{'kind':<12} {'mean ns':>10} {'median ns':>10} {'stdev ns':>10}")
        for name, values in means.items():
            print(
                f"{name:<12} {statistics.fmean(values):>10.1f}"
                f" {statistics.median(values):>10.1f} {statistics.stdev(values):>10.1f}"
            )
        near, far = means["near miss"], means["far miss"]
        print(
            f"near - far: {statistics.fmean(near) - statistics.fmean(far):+.1f} ns (means), "
            f"{statistics.median(near) - statistics.median(far):+.1f} ns (medians)"
        )


def over_http(requests: int) -> None:
    """A real server: gunicorn gthread, the Flask blueprint, GET /v1/models."""
    import httpx

    presented = kinds()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keys.txt"
        path.write_text(f"{KEY}\n")
        args = [PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "1"]
        args += ["-b", "127.0.0.1:{port}", "--log-level", "warning", "auth_apps:app"]
        env = {"AUTH_APP": "flask", "AUTH_MODE": "file", "AUTH_KEYS_FILE": str(path)}
        env["AUTH_LOG_LEVEL"] = "WARNING"
        with (
            run_server(args, port=free_port(), env=env) as server,
            httpx.Client(base_url=server.url, timeout=30) as client,
        ):
            samples: dict[str, list[float]] = {name: [] for name in presented}
            headers = {name: {"Authorization": f"Bearer {key}"} for name, key in presented.items()}
            for name in presented:  # warm up every path
                client.get("/v1/models", headers=headers[name])
            for _ in range(requests):
                for name in presented:
                    start = time.perf_counter_ns()
                    client.get("/v1/models", headers=headers[name])
                    samples[name].append((time.perf_counter_ns() - start) / 1000)
    print(f"\nover HTTP: gunicorn gthread, {requests} requests per kind, interleaved")
    print(f"{'kind':<12} {'mean us':>10} {'median us':>10} {'stdev us':>10}")
    for name, values in samples.items():
        print(
            f"{name:<12} {statistics.fmean(values):>10.1f} {statistics.median(values):>10.1f}"
            f" {statistics.stdev(values):>10.1f}"
        )
    near, far = samples["near miss"], samples["far miss"]
    print(
        f"near - far: {statistics.fmean(near) - statistics.fmean(far):+.1f} us (means), "
        f"{statistics.median(near) - statistics.median(far):+.1f} us (medians)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--no-http", action="store_true", help="only the in-process part")
    args = parser.parse_args()
    print(f"configured key: {len(KEY)} characters")
    in_process(args.rounds, args.calls)
    if not args.no_http:
        over_http(args.requests)


if __name__ == "__main__":
    main()
