"""The ``llmbridge`` command (``python -m llmbridge``), run as a real process: help on
every command, errors as one line without a traceback, and ``bench``."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from llmbridge._cli.bench import find_tables
from llmbridge._cli.main import COMMANDS

from support import PYTHON, ROOT, free_port

pytestmark = pytest.mark.timeout(120)

INSTALLED = [c for c in COMMANDS if importlib.util.find_spec(f"llmbridge._cli.{c}") is not None]
FAST_BENCH = ["bench", "batching", "--fixed", "1", "--per-item", "0.01"]


def llmbridge(
    *args: str, cwd: Path = ROOT, pythonpath: Path = ROOT, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m llmbridge ARGS`` (or ``python -c CODE``) with ``pythonpath`` first."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath), PYTHONUNBUFFERED="1")
    argv = [PYTHON, "-c", code, *args] if code else [PYTHON, "-m", "llmbridge", *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=100)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_console_script_runs_the_same_main() -> None:
    """pyproject's ``llmbridge`` script and ``python -m llmbridge`` call one function."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["llmbridge"] == "llmbridge._cli.main:main"
    assert "main(" in (ROOT / "llmbridge" / "__main__.py").read_text()


def test_help_lists_every_installed_command() -> None:
    result = llmbridge("--help")
    assert result.returncode == 0, result.stderr
    for command in INSTALLED:
        assert command in result.stdout
    assert {"demo", "bench"} <= set(INSTALLED)


@pytest.mark.parametrize("command", INSTALLED)
def test_help_on_every_command(command: str) -> None:
    result = llmbridge(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: llmbridge {command}")


def test_no_command_prints_the_help_and_exits_2() -> None:
    result = llmbridge()
    assert result.returncode == 2
    assert "usage: llmbridge" in result.stdout


def test_an_unknown_benchmark_is_one_line_naming_the_known_ones() -> None:
    line = one_line_error(llmbridge("bench", "nosuch"))
    assert line.startswith("llmbridge bench: no benchmark 'nosuch': choose from ")
    assert "batching" in line


def test_a_port_in_use_is_one_line() -> None:
    """werkzeug would print three lines and exit 1; the demo says it in one."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        line = one_line_error(llmbridge("demo", "--port", str(port), "--no-preview"))
    assert line == (
        f"llmbridge demo: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(--port 0 picks a free one)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2"], "llmbridge demo: --workers needs --shared-engine"),
        (["--shared-engine", "--workers", "0"], "llmbridge demo: --workers must be at least 1"),
    ],
    ids=["workers-alone", "no-workers"],
)
def test_demo_worker_options_are_checked_in_one_line(args: list[str], message: str) -> None:
    """--workers is --shared-engine's, and needs one worker at least."""
    assert one_line_error(llmbridge("demo", "--port", "0", *args)).startswith(message)


@pytest.mark.parametrize("args", [["demo"], ["bench", "batching"]], ids=["demo", "bench"])
def test_outside_a_clone_demo_and_bench_say_they_need_one(args: list[str], tmp_path: Path) -> None:
    """Installed without the repository (as from a wheel: no examples/, no benchmarks/),
    the commands say where to get a clone instead of failing on an import."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "llmbridge", site / "llmbridge")
    line = one_line_error(llmbridge(*args, cwd=tmp_path, pythonpath=site))
    assert "only a clone of the repository has: git clone https://" in line


def test_bench_with_no_name_lists_the_benchmarks() -> None:
    result = llmbridge("bench")
    assert result.returncode == 0, result.stderr
    helpers = ("stream_apps",)  # and _-prefixed modules: imported by benchmarks, not run
    names = sorted(
        p.stem
        for p in (ROOT / "benchmarks").glob("*.py")
        if p.stem not in helpers and not p.stem.startswith("_")
    )
    for name in names:
        assert f"\n  {name} " in result.stdout


def test_bench_runs_a_benchmark_prints_its_table_and_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    png = tmp_path / "batching.png"
    result = llmbridge("bench", "--plot", str(png), *FAST_BENCH[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "concurrent | unbatched req/s" in result.stdout
    assert "       128 |" in result.stdout
    assert f"llmbridge bench: wrote {png}" in result.stdout
    assert "benchmark batching" in result.stderr  # the progress bar
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_without_the_extra_prints_the_table_and_says_what_to_install(
    tmp_path: Path,
) -> None:
    """No matplotlib and no tqdm: the table still prints; the plot is skipped with a
    line naming the extra."""
    code = (
        "import sys; sys.modules['matplotlib'] = sys.modules['tqdm'] = None\n"
        "from llmbridge._cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    result = llmbridge(*FAST_BENCH, cwd=tmp_path, code=code)
    assert result.returncode == 0, result.stderr
    assert "concurrent | unbatched req/s" in result.stdout
    assert 'no plot without matplotlib: pip install -e ".[bench]"' in result.stdout
    assert not list(tmp_path.glob("*.png"))


def test_a_failing_benchmark_is_one_line() -> None:
    result = llmbridge("bench", "batching", "--no-such-option")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "llmbridge bench: benchmarks/batching.py exited with status 2"
    )


PIPES = """\
batch call = 1.0 ms

concurrent | unbatched req/s |  p50 ms | throughput x
----------------------------------------------------
         1 |           691.8 |     1.4 |          1.0
       128 |           575.6 |   222.8 |         26.5
"""

FIXED = """\
Pinging for 10 s while 4 clients call

mode         pings      p50 ms      p99 ms  /llm calls
plain           12       812.0       950.1           4
offload       9120         0.9         2.5          12
"""


def test_find_tables_reads_pipe_and_aligned_columns() -> None:
    (pipes,) = find_tables(PIPES)
    assert pipes.header == ["concurrent", "unbatched req/s", "p50 ms", "throughput x"]
    assert pipes.rows[1] == ["128", "575.6", "222.8", "26.5"]
    assert pipes.numeric_columns() == [1, 2, 3]
    (fixed,) = find_tables(FIXED)
    assert fixed.header == ["mode", "pings", "p50 ms", "p99 ms", "/llm calls"]
    assert fixed.rows == [
        ["plain", "12", "812.0", "950.1", "4"],
        ["offload", "9120", "0.9", "2.5", "12"],
    ]
    assert find_tables("just some words\nand more words\n") == []


def test_python_dash_m_runs_in_a_fresh_interpreter() -> None:
    result = llmbridge("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("llmbridge ")


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode().split("\0")
    except OSError:
        return []


def _wait_line(path: Path, start: str, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(start):
                return line
        assert proc.poll() is None, path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"no line {start!r}: {path.read_text()}")


@pytest.mark.parametrize(
    "stop", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"]
)
def test_demo_shared_engine_serves_two_workers_from_one_engine(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """`llmbridge demo --shared-engine --workers 2`: answers come from two worker pids,
    one engine process serves them all (its /stats, read from any worker, counts every
    worker's requests), and SIGINT / SIGTERM stops it all: an open stream finishes,
    exit 0, no process left, the socket and its directory removed. SIGKILL leaves no
    process either (each child stops once its parent is gone)."""
    import httpx

    port = free_port()
    log = tmp_path / "demo.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    argv = [PYTHON, "-m", "llmbridge", "demo", "--shared-engine", "--workers", "2"]
    argv += ["--port", str(port), "--no-preview", "--step-time", "0.01"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        line = _wait_line(log, "llmbridge demo: serving", proc)
        engine_pid = int(re.search(r"engine process \(pid (\d+)", line)[1])  # type: ignore[index]
        socket_path = re.search(r"socket (\S+)\)", line)[1]  # type: ignore[index]
        assert os.path.exists(socket_path)
        base = f"http://127.0.0.1:{port}"
        pids: set[str] = set()
        served = 0
        # Which worker accepts is the kernel's choice: rounds of 8 at once until both
        # have answered (a round where one took all is tried again, a few times).
        for _ in range(5):
            barrier = threading.Barrier(8)
            answers: list[tuple[str, str]] = []

            def ask(
                i: int, barrier: threading.Barrier = barrier, answers: list[Any] = answers
            ) -> None:
                with httpx.Client(base_url=base, timeout=30) as client:
                    barrier.wait(30)
                    params = {"prompt": f"p{i}", "max_tokens": 20}
                    r = client.get("/v1/stream", params=params)
                    assert r.status_code == 200
                    assert "event: done" in r.text
                    answers.append((r.headers["x-worker-pid"], r.text))

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(answers) == 8
            served += 8
            pids |= {pid for pid, _ in answers}
            if len(pids) == 2:
                break
        assert len(pids) == 2, pids
        assert str(engine_pid) not in pids
        with httpx.Client(base_url=base, timeout=10) as client:
            stats = client.get("/stats")
            # Host-wide: one worker's /stats counts what both workers submitted.
            assert stats.json()["engine"]["submitted"] >= served
        processes = _children(proc.pid)
        assert {int(p) for p in pids} <= processes
        engines = [p for p in processes if "--no-restart" in _cmdline(p)]
        assert engines == [engine_pid]  # one engine process, under its supervisor
        # Stopping with a stream open: the workers finish it (its final event), then
        # everything stops.
        with (
            httpx.Client(base_url=base, timeout=30) as client,
            client.stream("GET", "/v1/stream", params={"prompt": "last", "max_tokens": 80}) as r,
        ):
            lines = r.iter_lines()
            while not next(lines).startswith("data:"):
                pass
            proc.send_signal(stop)
            rest = list(lines)
        # Killed, the demo runs no cleanup, but its children see it go and stop, the
        # stream finished first; only its temporary directory is left.
        assert "event: done" in rest, rest[-4:]
        assert proc.wait(60) == (-9 if stop == signal.SIGKILL else 0), log.read_text()
        deadline = time.monotonic() + 10
        while _alive_any(processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive_any(processes)
        assert not os.path.exists(socket_path)
        if stop == signal.SIGKILL:
            shutil.rmtree(os.path.dirname(socket_path))
        assert not os.path.exists(os.path.dirname(socket_path))
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _alive_any(pids: set[int]) -> bool:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
        except OSError:
            pass
    return False
