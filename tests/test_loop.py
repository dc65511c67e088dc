"""The background loop (llmbridge/_runtime/loop.py): one loop, any thread, explicit start
and stop, fresh after fork."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from llmbridge._runtime import loop as loop_module
from llmbridge._runtime.loop import BackgroundLoop, background_loop, spawn

pytestmark = pytest.mark.timeout(30)


async def loop_id() -> int:
    return id(asyncio.get_running_loop())


def test_every_thread_reaches_the_same_loop() -> None:
    """spawn() from many threads runs on one long-lived loop, the current() one."""
    seen: set[int] = set()
    barrier = threading.Barrier(8)

    def call() -> None:
        barrier.wait()
        seen.add(spawn(loop_id()).result(10))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {id(background_loop())}
    assert background_loop() is BackgroundLoop.current().loop


def test_spawn_never_blocks_and_returns_a_future() -> None:
    """spawn() schedules a coroutine and returns a concurrent future."""
    future = spawn(loop_id())
    assert future.result(5) == id(background_loop())


@pytest.mark.anyio
async def test_spawn_from_another_loop() -> None:
    """spawn() is safe from a coroutine on a different loop."""
    future = spawn(loop_id())
    assert await asyncio.wrap_future(future) == id(background_loop())


def test_start_stop_and_start_again() -> None:
    """An explicit loop starts on start(), runs work, and stop() cancels what still runs
    on it (its clean-up runs), ends its thread and closes it; start() after stop() runs
    a new loop."""
    bg = BackgroundLoop(name="test-loop")
    assert not bg.running
    assert bg.thread is None
    assert bg.start() is bg
    assert bg.start() is bg
    first = bg.loop
    thread = bg.thread
    assert thread is not None
    assert thread.name == "test-loop"
    assert thread.daemon
    assert bg.spawn(loop_id()).result(5) == id(first)

    entered = threading.Event()
    cleaned = threading.Event()

    async def forever() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    pending = bg.spawn(forever())
    assert entered.wait(5)
    bg.stop(timeout=5)
    assert cleaned.is_set()
    assert pending.cancelled()
    assert not thread.is_alive()
    assert first.is_closed()
    assert not bg.running
    assert bg.thread is None
    bg.stop()  # idempotent

    bg.start()
    try:
        assert bg.loop is not first
        assert bg.spawn(loop_id()).result(5) == id(bg.loop)
    finally:
        bg.stop()


def test_stop_from_its_own_thread_is_refused() -> None:
    """stop() on the loop's own thread would wait for itself: it raises, and the loop
    keeps running."""
    bg = BackgroundLoop().start()
    try:

        async def stop_here() -> None:
            bg.stop()

        with pytest.raises(RuntimeError, match="own thread"):
            bg.spawn(stop_here()).result(5)
        assert bg.running
        assert bg.spawn(loop_id()).result(5) == id(bg.loop)
    finally:
        bg.stop()


def test_dead_portal_api_is_gone() -> None:
    """Portal, start_task_soon and background_portal were unused: they are removed."""
    for name in ("Portal", "background_portal", "start_task_soon"):
        assert not hasattr(loop_module, name)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_gets_a_working_loop() -> None:
    """After fork the child forgets the parent's loop (its thread stayed there) and its
    first use starts a fresh loop on a new thread that works; stopping it there and
    asking again starts a new one; the parent's loop runs on."""
    parent_loop = background_loop()
    parent_thread = BackgroundLoop.current().thread
    assert parent_thread is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 3
        try:
            current = BackgroundLoop.current()
            child_thread = current.thread
            ok = (
                spawn(loop_id()).result(5) == id(current.loop)
                and current.loop is not parent_loop
                and child_thread is not None
                and child_thread is not parent_thread
            )
            # Stopping the process-wide loop (done here, in the child, so the other
            # tests keep theirs): the next current() starts it again, on a new loop.
            stopped = current.loop
            current.stop()
            ok = ok and not current.running and stopped.is_closed()
            restarted = background_loop()
            ok = ok and restarted is not stopped and spawn(loop_id()).result(5) == id(restarted)
            code = 0 if ok else 1
        except BaseException:
            code = 2
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        reported = pipe.read(1)
    _, status = os.waitpid(pid, 0)
    assert reported == b"\x00"
    assert os.waitstatus_to_exitcode(status) == 0
    assert spawn(loop_id()).result(5) == id(parent_loop)
