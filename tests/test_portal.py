"""The process-wide background loop: one loop, any thread, fresh after fork."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from llmbridge._runtime.loop import background_loop, background_portal, spawn

pytestmark = pytest.mark.timeout(30)


async def loop_id() -> int:
    return id(asyncio.get_running_loop())


def test_every_thread_reaches_the_same_loop() -> None:
    """portal.call from many threads runs on one long-lived loop."""
    seen: set[int] = set()

    def call() -> None:
        seen.add(background_portal().call(loop_id))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {id(background_loop())}


def test_spawn_never_blocks_and_returns_a_future() -> None:
    """spawn() schedules a coroutine and returns a concurrent future."""
    future = spawn(loop_id())
    assert future.result(5) == id(background_loop())


@pytest.mark.anyio
async def test_spawn_from_another_loop() -> None:
    """spawn() is safe from a coroutine on a different loop."""
    future = spawn(loop_id())
    assert await asyncio.wrap_future(future) == id(background_loop())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_working_loop() -> None:
    """After fork the child's first use starts a fresh loop that works."""
    background_portal().call(loop_id)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ok = background_portal().call(loop_id) == id(background_loop())
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
