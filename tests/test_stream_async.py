"""Streams read from coroutines: any loop, cancellation, coalesced wake-ups."""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest

from llmbridge import Cancelled
from llmbridge._core.stream import Channel, Request, Stream, Wakeups
from llmbridge.testing import SimulatedGenerator, simulated_engine

from support import wait_until

pytestmark = [pytest.mark.timeout(30), pytest.mark.anyio]


async def test_async_for_yields_the_exact_text() -> None:
    """`async for` over an engine stream gives exactly the job's text."""
    with simulated_engine(step_time=0.001, max_new_tokens=12) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        chunks = [c async for c in engine.submit("async prompt")]
        assert "".join(chunks) == gen.expected_text("async prompt", 12)
        completion = await engine.submit("again").aresult()
        assert completion.text == gen.expected_text("again", 12)


async def test_cancelling_the_consuming_task_cancels_the_job() -> None:
    """Cancelling a task blocked in `async for` cancels the backend job."""
    with simulated_engine(step_time=0.002, max_new_tokens=10_000) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        stream = engine.submit("cancel me")
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in stream:
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(wait_until, lambda: stream.id in gen.cancelled)
        with pytest.raises(Cancelled):
            await stream.aresult()


async def test_breaking_out_of_async_for_cancels_the_job() -> None:
    """`break` in `async for` cancels the job when the iterator is dropped."""
    with simulated_engine(step_time=0.002, max_new_tokens=10_000) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        stream = engine.submit("break")
        async for _ in stream:
            break
        assert await asyncio.to_thread(wait_until, lambda: stream.id in gen.cancelled)


async def test_wait_for_timeout_on_aresult_cancels_the_job() -> None:
    """A consumer-side timeout around aresult() counts as giving up."""
    with simulated_engine(step_time=0.002, max_new_tokens=10_000) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        stream = engine.submit("slow")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.aresult(), 0.05)
        assert await asyncio.to_thread(wait_until, lambda: stream.id in gen.cancelled)


async def test_anext_text_timeout_returns_none_and_keeps_the_request() -> None:
    """A heartbeat-style timeout returns None without cancelling the request."""
    ch = Channel(Request("r", "p", {}))
    assert await ch.anext_text(timeout=0.01) is None
    assert not ch.ended
    ch.emit("later")
    assert await ch.anext_text(timeout=1) == "later"


async def test_one_engine_serves_several_event_loops_at_once() -> None:
    """Consumers on other loops in other threads read the same engine concurrently."""
    with simulated_engine(step_time=0.001, max_new_tokens=10) as engine:
        gen: SimulatedGenerator = engine.backend.generator
        results: dict[str, str] = {}
        lock = threading.Lock()

        def run_loop(n: int) -> None:
            async def main() -> None:
                async def one(i: int) -> None:
                    text = "".join([c async for c in engine.submit(f"L{n}-{i}")])
                    with lock:
                        results[f"L{n}-{i}"] = text

                await asyncio.gather(*(one(i) for i in range(20)))

            asyncio.run(main())

        threads = [threading.Thread(target=run_loop, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        local = [engine.submit(f"here-{i}") for i in range(10)]
        here = [await s.aresult() for s in local]
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        assert len(results) == 60
        for prompt, text in results.items():
            assert text == gen.expected_text(prompt, 10)
        for i, completion in enumerate(here):
            assert completion.text == gen.expected_text(f"here-{i}", 10)


async def test_wakeups_are_coalesced_per_loop() -> None:
    """Many waiters on one loop are woken with a single call_soon_threadsafe."""
    loop = asyncio.get_running_loop()
    calls = 0
    original = loop.call_soon_threadsafe

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    channels = [Channel(Request(f"r{i}", "p", {})) for i in range(50)]
    tasks = [asyncio.create_task(ch.anext_text()) for ch in channels]
    await asyncio.sleep(0)  # let every task register its waiter
    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        wakeups = Wakeups()

        def produce() -> None:
            for ch in channels:
                ch.emit("t", wakeups=wakeups)
            wakeups.flush()

        await asyncio.to_thread(produce)
        assert await asyncio.gather(*tasks) == ["t"] * 50
    finally:
        del loop.call_soon_threadsafe
    # asyncio.to_thread itself wakes the loop once; the 50 waiters cost one more.
    assert calls <= 2


async def test_async_stream_context_manager_cancels() -> None:
    """`async with stream:` cancels an unfinished stream on exit."""
    ch = Channel(Request("r", "p", {}))
    async with Stream(ch):
        pass
    with pytest.raises(Cancelled):
        await Stream(ch).aresult()


async def test_aresult_and_await_started_take_a_timeout_that_cancels() -> None:
    """The async twins time out like result()/wait_started(): Timeout, and the job stops."""
    from llmbridge import Timeout

    for wait in ("aresult", "await_started"):
        hooks: list[str] = []
        ch = Channel(Request("r", "p", {}), on_cancel=functools.partial(hooks.append, wait))
        with pytest.raises(Timeout):
            await getattr(Stream(ch), wait)(timeout=0.02)
        assert hooks == [wait]  # the producer was told to stop
        assert ch.ended
