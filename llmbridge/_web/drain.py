"""Graceful shutdown of one process's streams, shared by the ASGI adapter and the Quart bridge.

ASGI servers (uvicorn, hypercorn, gunicorn's uvicorn worker) send ``lifespan.shutdown``
only *after* every connection has closed, so an app that waits for that message to end
its streams waits forever, and the server (or gunicorn's arbiter, after its graceful
timeout) kills it mid-stream. :class:`Drain` therefore also listens for the signal that
starts the server's shutdown (SIGTERM, SIGINT): it chains in front of the server's own
handler, which still runs, and starts draining at once:

1. stop admitting: new requests get 503 with ``Retry-After`` (problem+json);
2. let in-flight streams run until ``timeout`` seconds have passed;
3. close the engines with what is left of that deadline
   (``engine.aclose(timeout)``), so every stream still running ends with a final
   ``event: error`` (:class:`~llmbridge.EngineClosed`, 503) and a clean end of the body.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import FrameType
from typing import Any

from .._exceptions import EngineClosed
from .body import LoopBody, StreamBody

__all__ = ["Drain", "as_hooks", "call_hook", "engines_of", "find_engines"]

logger = logging.getLogger("llmbridge")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class Drain:
    """Shutdown state of one served app. Loop-affine, except :meth:`request`.

    ``timeout`` is the whole budget from the signal to the last stream's end: keep it a
    few seconds under the server's own limit (gunicorn's ``graceful_timeout``).
    """

    def __init__(self, *, timeout: float = 10.0, retry_after: float = 5.0) -> None:
        if timeout < 0:
            raise ValueError(f"drain timeout must be >= 0, got {timeout!r}")
        if retry_after < 0:
            raise ValueError(f"retry_after must be >= 0, got {retry_after!r}")
        self.timeout = timeout
        self.retry_after = retry_after
        self._admitting = True
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        # Weak: a body a WSGI middleware iterated and never closed must not stay here.
        self._bodies: weakref.WeakSet[LoopBody] = weakref.WeakSet()
        self._bodies_lock = threading.Lock()  # bodies come and go on the app's threads
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engines: Callable[[], list[Any]] = list
        self._saved: dict[int, SignalHandler] = {}

    @property
    def admitting(self) -> bool:
        """False once draining began: answer new requests with :meth:`refusal`."""
        return self._admitting

    @property
    def in_flight(self) -> int:
        """Requests that entered and have not left yet."""
        return self._in_flight

    @property
    def bound(self) -> bool:
        """Whether :meth:`bind` attached it to a serving loop."""
        return self._loop is not None

    @property
    def open_bodies(self) -> int:
        """Stream bodies handed out and not closed yet (the drain ends them)."""
        with self._bodies_lock:
            return len(self._bodies)

    def refusal(self) -> EngineClosed:
        """The error new requests get while draining (503, ``Retry-After``)."""
        return EngineClosed("the server is shutting down", retry_after=self.retry_after)

    def enter(self) -> None:
        """Count a request in (on the loop)."""
        self._in_flight += 1

    def leave(self) -> None:
        """Count a request out (on the loop)."""
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    def track(self, body: LoopBody) -> None:
        """Remember an open body, to end it if the deadline passes. Thread-safe."""
        with self._bodies_lock:
            self._bodies.add(body)

    def untrack(self, body: LoopBody) -> None:
        """Forget a body that ended. Thread-safe."""
        with self._bodies_lock:
            self._bodies.discard(body)

    async def pump(self, body: StreamBody) -> AsyncIterator[bytes]:
        """``body``'s bytes, counted in and tracked while they flow (on the loop); the
        body is closed (its request cancelled if unfinished) however the pump ends."""
        self.enter()
        self.track(body)
        try:
            async for chunk in body:
                yield chunk
        finally:
            self.untrack(body)
            self.leave()
            body.close()

    # -- starting ---------------------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop, engines: Callable[[], list[Any]]) -> None:
        """Attach to the serving loop and say how to find the engines to close."""
        self._loop = loop
        self._engines = engines

    def install_signal_handlers(self) -> None:
        """Chain a handler for SIGTERM/SIGINT in front of the server's (main thread only).

        Call it once the server has installed its own handlers (at lifespan startup); the
        server's handler still runs after ours. A no-op off the main thread.
        """
        if threading.current_thread() is not threading.main_thread() or self._saved:
            return
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)
            self._saved[sig] = previous
            signal.signal(sig, self._make_handler(previous))

    def restore_signal_handlers(self) -> None:
        """Put back the handlers :meth:`install_signal_handlers` chained in front of."""
        if threading.current_thread() is not threading.main_thread():
            return
        saved, self._saved = self._saved, {}
        for sig, previous in saved.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def _make_handler(self, previous: SignalHandler) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.request()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                # Nobody else handles it: behave as if we weren't here.
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        return handler

    def request(self) -> None:
        """Start draining soon. Safe from any thread and from a signal handler."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._start)
        except RuntimeError:
            pass  # the loop closed meanwhile: nothing left to drain

    def _start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._task

    async def run(self) -> None:
        """Drain now (or wait for the drain already running) and return when done."""
        await asyncio.shield(self._start())

    # -- draining ---------------------------------------------------------------------

    async def _run(self) -> None:
        self._admitting = False
        deadline = time.monotonic() + self.timeout
        logger.info(
            "draining: %d request(s) in flight, %.1f s to finish", self._in_flight, self.timeout
        )
        engines = self._engines()
        closers = [asyncio.ensure_future(_close(engine, self.timeout)) for engine in engines]
        if self._in_flight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                pass
        if closers:
            await asyncio.gather(*closers)
        # Bodies over engines we were not told about: end them the same way.
        error = EngineClosed("the server shut down before the request finished")
        with self._bodies_lock:
            bodies = list(self._bodies)
        for body in bodies:
            body.stream.channel.fail(error)
        if bodies:
            logger.info("draining: ended %d open stream(s) at the deadline", len(bodies))


async def _close(engine: Any, timeout: float) -> None:
    try:
        aclose = getattr(engine, "aclose", None)
        if aclose is not None:
            await aclose(timeout)
        else:
            await asyncio.to_thread(engine.close, timeout)
    except Exception:
        logger.exception("closing %r failed", engine)


def _engine_like(obj: Any) -> bool:
    return callable(getattr(obj, "start", None)) and (
        callable(getattr(obj, "aclose", None)) or callable(getattr(obj, "close", None))
    )


def engines_of(*sources: Any) -> list[Any]:
    """The engines to start and close for ``sources``, by an explicit contract.

    Each source is one of: a *bridge*, anything whose class has an ``engines``
    attribute (``FlaskBridge.engines``), whose engines are taken; an *engine*,
    anything with ``start()`` and ``aclose()`` or ``close()`` (:class:`~llmbridge.Engine`,
    :class:`~llmbridge.policies.Pipeline`, a remote submitter), taken as it is; or an
    *app* whose ``extensions["llmbridge"]`` is a bridge (Flask, Quart) with ``engines``
    or a single ``engine``.
    Nothing else is searched: an app wrapped in other WSGI middleware passes its engines
    with ``engines=``. Deduplicated by identity, in order. Never raises, never blocks.
    """
    found: list[Any] = []
    seen: set[int] = set()

    def add(obj: Any) -> None:
        if obj is not None and id(obj) not in seen and _engine_like(obj):
            seen.add(id(obj))
            found.append(obj)

    def add_bridge(bridge: Any) -> bool:
        try:
            engines = getattr(bridge, "engines", None)
            if engines is None:
                # A bridge with one engine (QuartBridge) names it ``engine``.
                engine = getattr(bridge, "engine", None)
                engines = None if engine is None else [engine]
        except Exception:  # a property that needs a context it doesn't have
            return False
        if engines is None:
            return False
        for engine in list(engines):
            add(engine)
        return True

    for source in sources:
        if source is None:
            continue
        if hasattr(type(source), "engines"):  # a bridge (it may have start/close too)
            add_bridge(source)
            continue
        if _engine_like(source):
            add(source)
            continue
        extensions = getattr(source, "extensions", None)
        if isinstance(extensions, dict) and extensions.get("llmbridge") is not None:
            add_bridge(extensions["llmbridge"])
    return found


#: The former name of :func:`engines_of` (the Quart bridge calls it so).
find_engines = engines_of


async def call_hook(hook: Callable[[], Any]) -> None:
    """Run a startup/shutdown hook, sync (in a worker thread) or async."""
    if asyncio.iscoroutinefunction(hook):
        await hook()
        return
    result = await asyncio.to_thread(hook)
    if isinstance(result, Awaitable):
        await result


def as_hooks(hooks: Callable[[], Any] | Iterable[Callable[[], Any]] | None) -> list[Any]:
    """Normalise a hook option: ``None``, one callable or several."""
    if hooks is None:
        return []
    if callable(hooks):
        return [hooks]
    return list(hooks)
