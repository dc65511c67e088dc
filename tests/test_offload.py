"""Bounded offload to worker threads and processes (llmbridge/_runtime/offload.py,
llmbridge/_runtime/processes.py)."""

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
from llmbridge._runtime.offload import (
    DEFAULT,
    Offloader,
    OffloadError,
    RemoteError,
    run_in_process,
    run_in_thread,
)
from llmbridge._runtime.processes import RemoteTraceback

from support import wait_until

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


class ApiError(Exception):
    """Like many SDKs' errors: __init__ wants more than args holds."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def raise_api_error() -> None:
    raise ApiError("quota exhausted", 429)


def raise_local_error() -> None:
    class LocalError(Exception):
        pass

    raise LocalError("secret text")


def write_to_fds() -> str:
    os.write(1, b"offloaded write to fd 1\n")
    os.write(2, b"offloaded write to fd 2\n")
    return "ok"


def exit_abruptly() -> None:
    os._exit(7)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_process_errors_keep_their_type_or_say_what_they_were() -> None:
    """An exception whose __init__ can't be re-run from args comes back as itself, with
    its attributes and the remote traceback as __cause__; one whose class can't cross
    becomes RemoteError naming the type, message and traceback (500, not public)."""
    with pytest.raises(ApiError) as info:
        await run_in_process(raise_api_error)
    assert type(info.value) is ApiError
    assert (str(info.value), info.value.status_code) == ("quota exhausted", 429)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in raise_api_error" in str(info.value.__cause__)

    with pytest.raises(RemoteError) as remote:
        await run_in_process(raise_local_error)
    error = remote.value
    assert error.type_name == "test_offload.raise_local_error.<locals>.LocalError"
    assert error.remote_message == "secret text"
    assert "in raise_local_error" in error.remote_traceback
    assert isinstance(error, OffloadError)
    assert (error.status, error.public) == (500, False)
    assert "secret" not in error.public_message


@pytest.mark.timeout(60)
def test_process_workers_may_write_to_fds_1_and_2() -> None:
    """Output written straight to fds 1 and 2 doesn't disturb the worker's replies."""
    for _ in range(3):
        assert offloader.call_in_process(write_to_fds) == "ok"


@pytest.mark.timeout(60)
def test_process_failures_are_offload_errors_and_the_pool_recovers() -> None:
    """Arguments that can't be pickled and a worker that dies raise OffloadError; the
    pool then serves the next call."""
    with pytest.raises(OffloadError, match="can't be pickled"):
        offloader.call_in_process(whoami, threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(OffloadError, match=r"died \(exit code 7\)"):
        offloader.call_in_process(exit_abruptly)
    assert offloader.call_in_process(whoami, "after")[2] == "after"


@pytest.mark.timeout(30)
def test_thread_timeout_keeps_the_slot_and_queued_calls_never_run() -> None:
    """With one thread: a timed-out call keeps the slot while it runs on, so a second
    call times out waiting (and never runs), from a thread or a coroutine alike; once
    the first returns, calls run again."""
    single = Offloader(max_threads=1, timeout=0.2)
    release = threading.Event()
    ran: list[str] = []

    def stuck() -> None:
        release.wait(20)

    with pytest.raises(Timeout, match=r"stuck did not finish within 0\.2 s"):
        single.call_in_thread(stuck)
    with pytest.raises(Timeout):
        single.call_in_thread(ran.append, "queued")

    async def from_a_loop() -> None:
        with pytest.raises(Timeout):
            await single.arun_in_thread(ran.append, "queued on a loop")

    anyio.run(from_a_loop)
    release.set()
    assert single.call_in_thread(whoami, "free", timeout=10)[2] == "free"
    assert ran == []
    single.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.timeout(90)
def test_forked_child_gets_working_pools() -> None:
    """Pools started in the parent are forgotten in a forked child, which starts its
    own (its workers are its children); the parent's pools keep working after."""
    parent_worker = offloader.call_in_process(whoami, "parent")[0]
    offloader.call_in_thread(whoami, "parent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 3
        try:
            worker, _, tag = offloader.call_in_process(whoami, "child")
            _, ident, _ = offloader.call_in_thread(whoami, "child")
            with open(f"/proc/{worker}/stat") as stat:
                parent = int(stat.read().rsplit(") ", 1)[1].split()[1])
            ok = (tag, parent) == ("child", os.getpid()) and worker != parent_worker
            code = 0 if ok and ident != threading.get_ident() else 1
            offloader.close()
        except BaseException:
            code = 2
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        reported = pipe.read(1)
    os.waitpid(pid, 0)
    assert reported == b"\x00"
    assert offloader.call_in_process(whoami, "parent again")[2] == "parent again"
