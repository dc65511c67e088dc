"""Bounded offload to worker threads and processes (llmbridge/_offload.py)."""

from __future__ import annotations

import contextvars
import ctypes
import os
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from llmbridge import Timeout
from llmbridge._runtime.loop import spawn
from llmbridge._runtime.offload import DEFAULT, Offloader, run_in_process, run_in_thread

from conftest import wait_until

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

offloader = Offloader(max_threads=3, max_processes=2, timeout=30)


def whoami(tag: str, *, suffix: str = "") -> tuple[int, int, str]:
    """Module level, so a worker process can import it."""
    return os.getpid(), threading.get_ident(), tag + suffix


def fail(message: str) -> None:
    raise KeyError(message)


def hold_gil(seconds: float) -> float:
    """Sleep in C without releasing the GIL: a ctypes.PyDLL call keeps it held."""
    libc = ctypes.PyDLL(None)
    libc.usleep(int(seconds * 1_000_000))
    return seconds


def hold_gil_in(report: str, seconds: float) -> float:
    """Write this worker's pid to ``report``, then hold the GIL for ``seconds``."""
    with open(report, "w") as file:
        file.write(str(os.getpid()))
    return hold_gil(seconds)


@offloader.process(timeout=30)
def doubled_in_process(x: int) -> tuple[int, int]:
    """Decorated at module level: the wrapper replaces the function and still pickles."""
    return os.getpid(), x * 2


@offloader.thread()
def read_context() -> tuple[int, str]:
    return threading.get_ident(), request_id.get()


@pytest.mark.anyio
@pytest.mark.timeout(20)
async def test_run_in_thread_runs_elsewhere_with_caller_context() -> None:
    """The call runs on a worker thread, gets args and kwargs, and sees the caller's
    contextvars."""
    request_id.set("r-1")

    def probe(a: int, *, b: int) -> tuple[int, str, int]:
        return threading.get_ident(), request_id.get(), a + b

    ident, seen, total = await run_in_thread(probe, 1, b=2)
    assert ident != threading.get_ident()
    assert (seen, total) == ("r-1", 3)


@pytest.mark.anyio
@pytest.mark.timeout(20)
async def test_run_in_thread_propagates_errors() -> None:
    """The function's own exception reaches the caller unchanged."""
    with pytest.raises(KeyError, match="boom"):
        await run_in_thread(fail, "boom")


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_abandoned_thread_calls_stay_within_the_pool() -> None:
    """Timed-out calls keep their slot until they really end, so stuck calls never
    exceed the pool: with 2 slots, 6 timed-out calls start only 2 functions."""
    limiter = anyio.CapacityLimiter(2)
    release = threading.Event()
    started: list[int] = []
    lock = threading.Lock()

    def stuck() -> None:
        with lock:
            started.append(threading.get_ident())
        release.wait(20)

    async def call() -> None:
        with pytest.raises(Timeout) as info:
            await run_in_thread(stuck, timeout=0.3, limiter=limiter)
        assert info.value.status == 504
        assert "stuck did not finish within 0.3 s" in str(info.value)

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(call)
    assert len(started) == 2
    assert limiter.borrowed_tokens == 2  # held by the two abandoned threads

    release.set()
    assert await anyio.to_thread.run_sync(wait_until, lambda: limiter.borrowed_tokens == 0)
    assert await run_in_thread(whoami, "again", limiter=limiter)
    assert len(started) == 2


@pytest.mark.anyio
@pytest.mark.timeout(20)
async def test_finished_call_frees_its_slot_at_once() -> None:
    """A completed or failed call releases its token before the caller resumes."""
    limiter = anyio.CapacityLimiter(1)
    for _ in range(20):
        await run_in_thread(whoami, "x", limiter=limiter)
        with pytest.raises(KeyError):
            await run_in_thread(fail, "x", limiter=limiter)
        assert limiter.borrowed_tokens == 0


@pytest.mark.anyio
async def test_bad_timeout_is_refused() -> None:
    """A zero or negative timeout is a programming error, reported at once."""
    with pytest.raises(ValueError, match="timeout must be > 0"):
        await run_in_thread(whoami, "x", timeout=0)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        await run_in_process(whoami, "x", timeout=-1)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_run_in_process_gil_holder_does_not_block_the_loop() -> None:
    """A call that holds the GIL for 1 s runs in another process while this loop keeps
    ticking; kwargs and results cross the process boundary."""
    pid, _, tag = await run_in_process(whoami, "a", suffix="b")
    assert pid != os.getpid()
    assert tag == "ab"

    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        assert await run_in_process(hold_gil, 1.0) == 1.0
        tg.cancel_scope.cancel()
    # A blocked loop would tick about once; a free one about 100 times.
    assert ticks > 20


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_run_in_process_timeout_kills_the_worker(tmp_path: Path) -> None:
    """A process call that outlives its timeout raises Timeout and its worker process is
    killed, freeing the slot."""
    limiter = anyio.CapacityLimiter(1)
    await run_in_process(whoami, "warm", limiter=limiter)
    # The pool has several workers: the call itself says which one ran it.
    report = tmp_path / "pid"
    with pytest.raises(Timeout, match=r"hold_gil_in did not finish within 0\.5 s"):
        await run_in_process(hold_gil_in, str(report), 30.0, timeout=0.5, limiter=limiter)
    assert limiter.borrowed_tokens == 0
    pid = int(report.read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A killed child stays a zombie until reaped: check its state.
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] in "ZX"

    assert wait_until(gone, timeout=10)
    new_pid, _, _ = await run_in_process(whoami, "again", limiter=limiter)
    assert new_pid != pid


@pytest.mark.anyio
@pytest.mark.timeout(20)
async def test_run_in_process_propagates_errors() -> None:
    """The function's own exception is pickled back and raised."""
    with pytest.raises(KeyError, match="far away"):
        await run_in_process(fail, "far away")


@pytest.mark.timeout(30)
def test_offloader_blocking_calls_from_threads() -> None:
    """From plain threads, call_in_thread runs on a pool thread with the caller's
    context, and never more than max_threads at once."""
    inside = 0
    peak = 0
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def work(n: int) -> tuple[str, int]:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.02)
        with lock:
            inside -= 1
        return request_id.get(), n

    results: dict[int, tuple[str, int]] = {}

    def caller(n: int) -> None:
        request_id.set(f"caller-{n}")
        barrier.wait()
        for i in range(5):
            results[n * 10 + i] = offloader.call_in_thread(work, n * 10 + i)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(results) == 40
    for key, (seen, n) in results.items():
        assert (seen, n) == (f"caller-{key // 10}", key)
    assert 1 <= peak <= offloader.max_threads


@pytest.mark.timeout(60)
def test_offloader_decorators() -> None:
    """thread() and process() decorators: the wrapped functions run in a pool thread and
    in a worker process, and keep their names."""
    request_id.set("decorated")
    ident, seen = read_context()
    assert ident != threading.get_ident()
    assert seen == "decorated"
    assert read_context.__name__ == "read_context"

    pid, doubled = doubled_in_process(21)
    assert pid != os.getpid()
    assert doubled == 42
    assert doubled_in_process.__name__ == "doubled_in_process"


@pytest.mark.timeout(20)
def test_offloader_timeouts_default_and_override() -> None:
    """The offloader's default timeout applies unless a call passes its own."""
    quick = Offloader(max_threads=2, timeout=0.2)
    with pytest.raises(Timeout):
        quick.call_in_thread(time.sleep, 2)
    assert quick.call_in_thread(whoami, "ok", timeout=None)[2] == "ok"
    assert quick.call_in_thread(whoami, "ok", timeout=DEFAULT)[2] == "ok"


@pytest.mark.anyio
@pytest.mark.timeout(20)
async def test_offloader_async_methods_on_a_caller_loop() -> None:
    """arun_in_thread works on any running loop, with the offloader's own pool."""
    pid, ident, tag = await offloader.arun_in_thread(whoami, "loop", suffix="!")
    assert (pid, tag) == (os.getpid(), "loop!")
    assert ident != threading.get_ident()
    assert await read_context.acall() is not None


def test_offloader_rejects_bad_configuration() -> None:
    """Pool sizes must be positive ints and the timeout positive."""
    with pytest.raises(ValueError, match="max_threads"):
        Offloader(max_threads=0)
    with pytest.raises(ValueError, match="max_processes"):
        Offloader(max_processes=True)
    with pytest.raises(ValueError, match="timeout"):
        Offloader(timeout=0)


@pytest.mark.timeout(60)
def test_workers_outlive_calls() -> None:
    """Workers outlive the calls they serve: sequential calls are served by the pool's
    (at most max_processes) long-lived workers, still alive afterwards, and a call
    ending never kills the worker of another call still running."""
    pids = {offloader.call_in_process(whoami, "seq")[0] for _ in range(5)}
    # pebble keeps max_processes workers warm and any idle one takes the next call.
    assert 1 <= len(pids) <= offloader.max_processes
    for pid in pids:
        os.kill(pid, 0)  # still running
    threads = {offloader.call_in_thread(threading.get_ident) for _ in range(5)}
    # concurrent.futures may start another thread while an idle one is about to
    # report idle, never more than max_threads.
    assert 1 <= len(threads) <= offloader.max_threads

    long_call = spawn(offloader.arun_in_process(hold_gil, 0.5))
    assert spawn(offloader.arun_in_process(whoami, "short")).result(30)[2] == "short"
    assert long_call.result(30) == 0.5


@pytest.mark.anyio
async def test_blocking_calls_are_refused_on_an_event_loop() -> None:
    """call_in_thread on a running loop would stall it: it raises and names the twin."""
    with pytest.raises(RuntimeError, match="await arun_in_thread"):
        offloader.call_in_thread(whoami, "x")
