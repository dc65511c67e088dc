"""Callable backends: sync and async functions and generators, bounded threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from llmbridge import BackendError, Cancelled, Engine, EngineClosed
from llmbridge.backends import CallableBackend

from support import wait_until

pytestmark = pytest.mark.timeout(30)


def test_sync_function_returning_str() -> None:
    """fn(prompt, **params) -> str becomes one chunk and a completion."""
    with Engine(lambda prompt, suffix="": prompt + suffix) as engine:
        assert engine.submit("a", suffix="b").result(timeout=10).text == "ab"


def test_sync_generator_streams_chunks() -> None:
    """A sync generator's chunks arrive in order."""

    def gen(prompt: str) -> Iterator[str]:
        yield from prompt

    with Engine(gen) as engine:
        assert "".join(engine.submit("hello")) == "hello"


def test_async_function_and_async_generator() -> None:
    """Coroutine functions and async generators run on the engine's loop."""

    async def coro(prompt: str) -> str:
        await asyncio.sleep(0)
        return prompt.upper()

    async def agen(prompt: str) -> AsyncIterator[str]:
        for word in prompt.split():
            await asyncio.sleep(0)
            yield word + " "

    with Engine(coro) as e1, Engine(agen) as e2:
        assert e1.submit("abc").result(timeout=10).text == "ABC"
        assert e2.submit("one two three").result(timeout=10).text == "one two three "


def test_async_callables_share_one_engine_loop() -> None:
    """Every request of an async backend runs on the same, long-lived event loop."""
    loops: set[int] = set()

    async def which_loop(prompt: str) -> str:
        loops.add(id(asyncio.get_running_loop()))
        return prompt

    with Engine(which_loop) as engine:
        for i in range(20):
            engine.submit(str(i)).result(timeout=10)
        results = [engine.submit(str(i)) for i in range(20)]
        for s in results:
            s.result(timeout=10)
    assert len(loops) == 1


def test_sync_calls_run_in_a_bounded_pool() -> None:
    """No more than max_threads sync calls run at once."""
    running = 0
    peak = 0
    lock = threading.Lock()

    def work(prompt: str) -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        return prompt

    with Engine(CallableBackend(work, max_threads=3)) as engine:
        streams = [engine.submit(str(i)) for i in range(30)]
        assert [s.result(timeout=20).text for s in streams] == [str(i) for i in range(30)]
    assert peak == 3


def test_cancel_closes_a_sync_generator_between_chunks() -> None:
    """A sync generator stops at the next chunk after its consumer cancels."""
    closed = threading.Event()
    produced = 0

    def endless(prompt: str) -> Iterator[str]:
        nonlocal produced
        try:
            while True:
                produced += 1
                time.sleep(0.001)
                yield "x"
        finally:
            closed.set()

    with Engine(endless) as engine:
        stream = engine.submit("go")
        it = iter(stream)
        next(it)
        stream.cancel()
        assert closed.wait(5)
        count = produced
        time.sleep(0.05)
        assert produced == count


def test_cancel_cancels_an_async_generator_task() -> None:
    """Cancelling a stream cancels the async generator's task and closes it."""
    closed = threading.Event()

    async def endless(prompt: str) -> AsyncIterator[str]:
        try:
            while True:
                await asyncio.sleep(0.001)
                yield "y"
        finally:
            closed.set()

    with Engine(endless) as engine:
        stream = engine.submit("go")
        next(iter(stream))
        stream.cancel()
        assert closed.wait(5)
        assert wait_until(lambda: engine.in_flight == 0)


def test_exception_fails_only_that_request() -> None:
    """An exception from the callable becomes BackendError for that request only."""

    def flaky(prompt: str) -> str:
        if prompt == "bad":
            raise ValueError("no good")
        return prompt

    with Engine(flaky) as engine:
        bad = engine.submit("bad")
        good = engine.submit("good")
        with pytest.raises(BackendError, match="ValueError: no good") as info:
            bad.result(timeout=10)
        assert isinstance(info.value.__cause__, ValueError)
        assert good.result(timeout=10).text == "good"


def test_wrong_return_type_is_a_clear_error() -> None:
    """Returning something that is neither text nor chunks fails clearly."""
    with Engine(lambda prompt: 42) as engine, pytest.raises(BackendError, match="expected str"):
        engine.submit("x").result(timeout=10)


def test_close_deadline_cancels_async_work() -> None:
    """Async work still running at the close deadline ends with EngineClosed."""
    started = threading.Event()

    async def hang(prompt: str) -> str:
        started.set()
        await asyncio.sleep(3600)
        return prompt

    engine = Engine(hang)
    stream = engine.submit("x")
    assert started.wait(5)
    engine.close(timeout=0.1)
    with pytest.raises((EngineClosed, Cancelled)):
        stream.result(timeout=5)


def test_async_backend_aopen_and_aclose_run_on_the_engine_loop() -> None:
    """A backend's aopen/aclose hooks run once, on the loop that serves requests."""
    events: list[tuple[str, int]] = []

    class Client:
        max_concurrency = 8

        async def aopen(self) -> None:
            events.append(("open", id(asyncio.get_running_loop())))

        async def aclose(self) -> None:
            events.append(("close", id(asyncio.get_running_loop())))

        async def generate(self, request: object, job: object) -> None:
            events.append(("gen", id(asyncio.get_running_loop())))
            job.emit("ok")  # type: ignore[attr-defined]

        def serve(self, jobs: object) -> None:
            from llmbridge.backends import serve_async

            serve_async(self, jobs, max_concurrency=self.max_concurrency)  # type: ignore[arg-type]

    with Engine(Client()) as engine:
        assert engine.submit("x").result(timeout=10).text == "ok"
    assert [e[0] for e in events] == ["open", "gen", "close"]
    assert len({e[1] for e in events}) == 1


_LOOP_PROBE = """
import asyncio, sys
from llmbridge import Engine
from llmbridge.backends import serve_async

class Probe:
    async def generate(self, request, job):
        job.emit(type(asyncio.get_running_loop()).__module__)

    def serve(self, jobs):
        serve_async(self, jobs, max_concurrency=4)

with Engine(Probe()) as engine:
    print(engine.submit("x").result(timeout=10).text)
"""


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "without-uvloop"])
def test_async_backends_run_on_uvloop_when_it_is_installed(uvloop: bool) -> None:
    """The engine thread's loop is uvloop's when uvloop imports (the http extra installs
    it), and asyncio's otherwise; a backend works on either."""
    import subprocess
    import sys

    if uvloop:
        pytest.importorskip("uvloop")
    hide = "" if uvloop else "import sys; sys.modules['uvloop'] = None\n"
    done = subprocess.run(
        [sys.executable, "-c", hide + _LOOP_PROBE], capture_output=True, text=True, timeout=25
    )
    assert done.returncode == 0, done.stderr
    module = done.stdout.strip()
    if uvloop:
        assert module == "uvloop"
    else:
        assert module.startswith("asyncio"), module


def test_bad_callable_backend_options() -> None:
    """Zero or negative pool sizes fail at construction."""
    with pytest.raises(ValueError, match="max_threads"):
        CallableBackend(lambda p: p, max_threads=0)
    with pytest.raises(ValueError, match="max_concurrency"):
        CallableBackend(lambda p: p, max_concurrency=-1)
    with pytest.raises(TypeError):
        CallableBackend("not callable")  # type: ignore[arg-type]


def test_a_cancelled_sync_call_keeps_its_slot_until_its_thread_stops() -> None:
    """With one slot, the next call starts only after the cancelled one's thread ended."""
    inside = threading.Lock()
    collisions = 0

    def fn(prompt: str) -> Iterator[str]:
        nonlocal collisions
        if not inside.acquire(blocking=False):
            collisions += 1
            yield "collision"
            return
        try:
            for i in range(200):
                time.sleep(0.002)
                yield f"{prompt}{i} "
        finally:
            inside.release()

    with Engine(CallableBackend(fn, max_concurrency=1, max_threads=1)) as engine:
        first = engine.submit("a")
        next(iter(first))
        first.cancel()
        assert engine.submit("b").result(timeout=20).text.startswith("b0 b1 ")
    assert collisions == 0


def test_cancelling_a_queued_request_frees_its_admission_slot_at_once() -> None:
    """A request cancelled while still queued stops counting against max_queued."""
    release = threading.Event()

    def slow(prompt: str) -> str:
        release.wait(10)
        return prompt

    engine = Engine(CallableBackend(slow, max_concurrency=1, max_threads=1), max_queued=2)
    try:
        running = engine.submit("running")
        assert wait_until(lambda: engine.queued == 0)
        queued = [engine.submit("q1"), engine.submit("q2")]
        for s in queued:
            s.cancel()
        assert wait_until(lambda: engine.queued == 0)
        replacement = [engine.submit("r1"), engine.submit("r2")]
        release.set()
        assert running.result(timeout=10).text == "running"
        assert [s.result(timeout=10).text for s in replacement] == ["r1", "r2"]
        assert engine.queued == 0
    finally:
        release.set()
        engine.close()
