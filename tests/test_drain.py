"""llmbridge._web.drain: which engines a served app has (an explicit contract, no attribute
walk), admission while draining, open bodies ended with their final event, signal
chaining, hooks."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
from typing import Any

import pytest
from flask import Flask

from llmbridge import EngineClosed
from llmbridge._sansio.sse import SSEDecoder
from llmbridge._web.body import StreamBody
from llmbridge._web.drain import Drain, as_hooks, call_hook, engines_of
from llmbridge.flask import FlaskBridge
from llmbridge.policies import Pipeline
from llmbridge.testing import simulated_engine

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]


class FakeEngine:
    """Engine-shaped: start() and aclose(); records the timeout it was closed with."""

    def __init__(self) -> None:
        self.started = 0
        self.closed_with: list[float | None] = []

    def start(self) -> None:
        self.started += 1

    async def aclose(self, timeout: float | None = None) -> None:
        self.closed_with.append(timeout)


class SyncOnly:
    """Engine-shaped with a blocking close() only."""

    def __init__(self) -> None:
        self.closed_on: list[str] = []

    def start(self) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        self.closed_on.append(threading.current_thread().name)


# -- engines_of: the contract ----------------------------------------------------------


async def test_an_engine_is_taken_as_it_is() -> None:
    """Anything with start() and aclose() or close() is an engine: Engine, Pipeline."""
    engine = simulated_engine()
    pipeline = Pipeline(engine)
    sync = SyncOnly()
    assert engines_of(engine, pipeline, sync) == [engine, pipeline, sync]


async def test_a_bridges_engines_attribute_is_asked() -> None:
    """A bridge (``.engines``) or an app holding one in extensions["llmbridge"]."""
    first, second = simulated_engine(), simulated_engine()
    app_a, app_b = Flask("a"), Flask("b")
    bridge = FlaskBridge(engine=first)
    bridge.init_app(app_a)
    FlaskBridge(app_b, engine=second)
    assert engines_of(bridge) == [first]
    assert engines_of(app_a) == [first]
    assert engines_of(app_b, app_a) == [second, first]


async def test_a_single_engine_bridge_names_it_engine() -> None:
    """A bridge without ``engines`` but with ``engine`` (the Quart bridge's shape)."""
    engine = FakeEngine()

    class OneEngineBridge:
        def __init__(self) -> None:
            self.engine = engine

    class App:
        def __init__(self) -> None:
            self.extensions = {"llmbridge": OneEngineBridge()}

    assert engines_of(App()) == [engine]


async def test_nothing_else_is_searched() -> None:
    """No attribute walk: an engine nested in arbitrary attributes, or behind WSGI
    middleware, is not found (pass it with engines=)."""
    engine = FakeEngine()

    class Holder:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.app = inner
            self._engine = inner

    app = Flask("wrapped")
    FlaskBridge(app, engine=simulated_engine())
    assert engines_of(Holder(engine), Holder(Holder(engine)), Holder(app)) == []
    assert engines_of(None, object(), 3, "engine") == []


async def test_engines_are_deduplicated_in_order() -> None:
    """The same engine given twice, or given and found on the app, is closed once."""
    engine = simulated_engine()
    app = Flask("dup")
    FlaskBridge(app, engine=engine)
    other = FakeEngine()
    assert engines_of(other, engine, app, other) == [other, engine]


async def test_a_bridge_property_that_raises_is_skipped() -> None:
    """A bridge whose engines need a context it lacks yields nothing; never raises."""

    class Moody:
        @property
        def engines(self) -> list[Any]:
            raise RuntimeError("outside of an application context")

    assert engines_of(Moody()) == []


# -- admission -------------------------------------------------------------------------


async def test_draining_refuses_with_503_and_retry_after() -> None:
    """Once drained, admitting is False and the refusal is EngineClosed with Retry-After."""
    drain = Drain(timeout=0, retry_after=7)
    drain.bind(asyncio.get_running_loop(), list)
    assert drain.admitting
    await drain.run()
    assert not drain.admitting
    refusal = drain.refusal()
    assert isinstance(refusal, EngineClosed)
    assert (refusal.status, refusal.retry_after) == (503, 7)


async def test_options_are_validated() -> None:
    """Negative timeouts fail at construction."""
    with pytest.raises(ValueError, match="timeout"):
        Drain(timeout=-1)
    with pytest.raises(ValueError, match="retry_after"):
        Drain(retry_after=-1)


async def test_drain_waits_for_in_flight_requests_then_closes_engines() -> None:
    """run() returns once in-flight requests left; each engine gets the whole budget."""
    engine = FakeEngine()
    drain = Drain(timeout=5)
    drain.bind(asyncio.get_running_loop(), lambda: [engine])
    drain.enter()
    task = asyncio.ensure_future(drain.run())
    await asyncio.sleep(0)
    assert not task.done()
    assert drain.in_flight == 1
    drain.leave()
    await asyncio.wait_for(task, 5)
    assert engine.closed_with == [5]


async def test_a_sync_only_engine_is_closed_off_the_loop() -> None:
    """An engine with only close() is closed in a worker thread, not on the loop."""
    engine = SyncOnly()
    drain = Drain(timeout=1)
    drain.bind(asyncio.get_running_loop(), lambda: [engine])
    await drain.run()
    assert len(engine.closed_on) == 1
    assert engine.closed_on[0] != threading.current_thread().name


# -- open bodies -----------------------------------------------------------------------


async def test_open_bodies_over_unknown_engines_end_with_their_final_event() -> None:
    """A tracked body whose engine the drain doesn't close still ends, at the deadline,
    with event: error (EngineClosed, 503) read by its own consumer."""
    engine = simulated_engine(step_time=0.01)
    try:
        body = StreamBody(engine.submit("long", max_new_tokens=100_000), heartbeat=None)
        drain = Drain(timeout=0.05)
        drain.bind(asyncio.get_running_loop(), list)  # no engines known
        drain.track(body)
        assert drain.open_bodies == 1
        events = []
        decoder = SSEDecoder()

        async def consume() -> None:
            async for chunk in body:
                events.extend(decoder.feed(chunk))
                if len(events) == 1:
                    drain.request()  # as the SIGTERM handler does

        await asyncio.wait_for(consume(), 10)
        assert events[-1].event == "error"
        assert events[-1].json()["error"] == "EngineClosed"
        assert events[-1].json()["status"] == 503
    finally:
        engine.close()


async def test_bodies_are_tracked_weakly_and_untracked() -> None:
    """untrack() forgets a body; one nobody closed is forgotten once it is garbage."""
    engine = simulated_engine()
    try:
        drain = Drain()
        kept = StreamBody(engine.submit("a"))
        drain.track(kept)
        drain.untrack(kept)
        assert drain.open_bodies == 0
        dropped = StreamBody(engine.submit("b"))
        drain.track(dropped)
        del dropped
        gc.collect()
        assert drain.open_bodies == 0
    finally:
        engine.close()


# -- signals and hooks -----------------------------------------------------------------


async def test_signal_handler_starts_the_drain_and_chains_to_the_previous_one() -> None:
    """SIGTERM: our handler starts draining, then the server's own handler still runs;
    restore puts the server's back."""
    seen: list[int] = []

    def server_handler(signum: int, frame: Any) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, server_handler)
    try:
        drain = Drain(timeout=0)
        drain.bind(asyncio.get_running_loop(), list)
        drain.install_signal_handlers()
        signal.raise_signal(signal.SIGTERM)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not drain.admitting:
                break
        assert seen == [signal.SIGTERM]
        assert not drain.admitting
        drain.restore_signal_handlers()
        assert signal.getsignal(signal.SIGTERM) is server_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


async def test_request_is_safe_from_another_thread_and_before_bind() -> None:
    """request() before bind() is a no-op; from a thread it starts the drain on the loop."""
    drain = Drain(timeout=0)
    drain.request()
    assert drain.admitting
    drain.bind(asyncio.get_running_loop(), list)
    thread = threading.Thread(target=drain.request)
    thread.start()
    thread.join(5)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not drain.admitting:
            break
    assert not drain.admitting


async def test_hooks_sync_async_and_several() -> None:
    """as_hooks normalises the option; call_hook runs sync hooks off the loop."""
    ran: list[str] = []

    def sync_hook() -> None:
        ran.append(threading.current_thread().name)

    async def async_hook() -> None:
        ran.append("async")

    assert as_hooks(None) == []
    assert as_hooks(sync_hook) == [sync_hook]
    assert as_hooks([sync_hook, async_hook]) == [sync_hook, async_hook]
    for hook in as_hooks([sync_hook, async_hook]):
        await call_hook(hook)
    assert ran[0] != threading.current_thread().name
    assert ran[1] == "async"
