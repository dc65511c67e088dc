"""Flask async views on the bridge's one background loop (llmbridge/_flask_async.py)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import httpx
import pytest
from asgiref.sync import sync_to_async
from flask import Flask, g, request

from llmbridge._runtime.loop import BackgroundLoop, background_loop, spawn
from llmbridge.flask import FlaskBridge
from llmbridge.testing import SimulatedGenerator, simulated_engine

from support import PYTHON, free_port, run_server

trace: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("trace", default=())


class Upstream(ThreadingHTTPServer):
    """A real HTTP/1.1 server on 127.0.0.1 that counts requests and the client ports
    they came from (one port per TCP connection)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        self.requests = 0
        self.ports: set[int] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-request is not news here


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a pooling client can reuse
    disable_nagle_algorithm = True  # headers and body go in two writes
    server: Upstream

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests += 1
            self.server.ports.add(self.client_address[1])
        topic = self.path.rsplit("/", 1)[-1]
        body = json.dumps({"topic": topic, "text": f"notes on {topic}"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def background_thread_ident() -> int | None:
    thread = BackgroundLoop.current().thread
    return None if thread is None else thread.ident


def make_app(**options: Any) -> tuple[Flask, Any]:
    engine = simulated_engine(step_time=0.0005)
    app = Flask(__name__)
    app.config["TESTING"] = True
    FlaskBridge(app, engine=engine, **options)
    return app, engine


@pytest.mark.timeout(30)
def test_every_async_view_runs_on_the_one_background_loop() -> None:
    """Async views from many request threads all run on the same, persistent loop."""
    app, engine = make_app()
    loops: set[int] = set()

    @app.get("/")
    async def view() -> dict[str, int]:
        loops.add(id(asyncio.get_running_loop()))
        await asyncio.sleep(0)
        return {"ok": 1}

    def worker() -> None:
        client = app.test_client()
        for _ in range(20):
            assert client.get("/").json == {"ok": 1}

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert loops == {id(background_loop())}
    engine.close()


@pytest.mark.timeout(30)
def test_module_level_semaphore_and_lock_work_across_threads() -> None:
    """A module-level asyncio.Semaphore bounds concurrency across request threads, with
    no hang and no 'bound to a different event loop' error."""
    app, engine = make_app()
    semaphore = asyncio.Semaphore(2)
    lock = asyncio.Lock()
    inside = 0
    peak = 0
    counter = 0

    @app.get("/")
    async def view() -> dict[str, int]:
        nonlocal inside, peak, counter
        async with semaphore:
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.002)
            inside -= 1
        async with lock:
            counter += 1
        return {"ok": 1}

    barrier = threading.Barrier(10)

    def worker() -> None:
        client = app.test_client()
        barrier.wait()
        for _ in range(10):
            assert client.get("/").status_code == 200

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert counter == 100
    assert peak == 2
    engine.close()


@pytest.mark.timeout(30)
def test_context_flows_in_and_changes_flow_back() -> None:
    """Async hooks and views see the request, g and contextvars; what they set is seen
    by later sync and async hooks; teardown runs last, in order."""
    app, engine = make_app()
    seen: list[tuple[str, ...]] = []

    @app.before_request
    async def before() -> None:
        trace.set((*trace.get(), "before"))
        g.user = request.args.get("user")

    @app.get("/")
    def view() -> dict[str, Any]:
        trace.set((*trace.get(), "view"))
        return {"user": g.user}

    @app.get("/async")
    async def async_view() -> dict[str, Any]:
        trace.set((*trace.get(), "async-view"))
        return {"user": g.user, "path": request.path}

    @app.after_request
    async def after(response: Any) -> Any:
        trace.set((*trace.get(), "after"))
        response.headers["X-Trace"] = ",".join(trace.get())
        return response

    @app.teardown_request
    async def teardown(exc: BaseException | None) -> None:
        seen.append((*trace.get(), "teardown"))

    client = app.test_client()
    # The test client runs requests on this thread, whose context keeps what the
    # previous request carried back: start each request from a clean trace.
    trace.set(())
    reply = client.get("/?user=ada")
    assert reply.json == {"user": "ada"}
    assert reply.headers["X-Trace"] == "before,view,after"
    trace.set(())
    reply = client.get("/async?user=bob")
    assert reply.json == {"user": "bob", "path": "/async"}
    assert reply.headers["X-Trace"] == "before,async-view,after"
    assert seen == [
        ("before", "view", "after", "teardown"),
        ("before", "async-view", "after", "teardown"),
    ]
    engine.close()


@pytest.mark.timeout(30)
def test_thread_sensitive_sync_to_async_runs_on_the_request_thread() -> None:
    """asgiref's thread-sensitive sync_to_async inside an async view still runs on the
    request's own thread, as with Flask's default."""
    app, engine = make_app()

    seen: list[tuple[int, int]] = []

    @app.get("/")
    async def view() -> dict[str, bool]:
        ident = await sync_to_async(threading.get_ident)()
        seen.append((ident, threading.get_ident()))
        return {"ok": True}

    replies: list[Any] = []

    def request_thread() -> None:
        replies.append(app.test_client().get("/").json)

    # A thread of its own: asgiref leaves its "main loop" mark on any thread that ran
    # thread-sensitive work, and later tests use Flask's default on this one.
    thread = threading.Thread(target=request_thread)
    thread.start()
    thread.join(20)
    assert replies == [{"ok": True}]
    [(ident, loop_thread)] = seen
    assert ident == thread.ident
    assert loop_thread == background_thread_ident()
    engine.close()


@pytest.mark.timeout(30)
def test_async_error_handlers_and_agenerate() -> None:
    """Async error handlers run on the loop; agenerate and astream work in async views."""
    app, engine = make_app()
    bridge = app.extensions["llmbridge"]
    expected = engine.backend.generator.expected_text

    @app.errorhandler(KeyError)
    async def missing(error: KeyError) -> tuple[dict[str, Any], int]:
        return {"missing": str(error), "loop": id(asyncio.get_running_loop())}, 422

    @app.get("/boom")
    async def boom() -> str:
        raise KeyError("thing")

    @app.get("/gen")
    async def gen() -> dict[str, Any]:
        one, two = await asyncio.gather(
            bridge.agenerate("one", max_new_tokens=4), bridge.agenerate("two", max_new_tokens=4)
        )
        chunks = [c async for c in await bridge.astream("three", max_new_tokens=4)]
        return {"one": one, "two": two, "three": "".join(chunks)}

    @app.get("/sse")
    async def sse() -> Any:
        return await bridge.asse("four", max_new_tokens=4)

    client = app.test_client()
    reply = client.get("/boom")
    assert reply.status_code == 422
    assert reply.json == {"missing": "'thing'", "loop": id(background_loop())}
    assert client.get("/gen").json == {
        "one": expected("one", 4),
        "two": expected("two", 4),
        "three": expected("three", 4),
    }
    body = client.get("/sse").data.decode()
    assert "event: done" in body
    engine.close()


@pytest.mark.timeout(30)
def test_async_views_option_off_keeps_flasks_default() -> None:
    """LLMBRIDGE_ASYNC_VIEWS=False leaves Flask's own async_to_sync in place."""
    app, engine = make_app(async_views=False)
    assert "async_to_sync" not in vars(app)
    # Keep the loops themselves: a closed loop's id() may be reused by the next one.
    loops: list[asyncio.AbstractEventLoop] = []

    @app.get("/")
    async def view() -> str:
        loops.append(asyncio.get_running_loop())
        return "ok"

    client = app.test_client()
    client.get("/")
    client.get("/")
    assert len({id(loop) for loop in loops}) == 2  # asgiref: a new loop per call
    engine.close()


@pytest.mark.timeout(30)
def test_without_the_bridge_a_module_level_client_breaks(upstream: Upstream) -> None:
    """The failure the bridge fixes, reproduced: with Flask's default, a module-level
    httpx.AsyncClient fails on the second request; with the bridge it doesn't."""
    for with_bridge in (False, True):
        app = Flask(__name__)
        app.config["TESTING"] = True
        client = httpx.AsyncClient()
        engine = simulated_engine()
        if with_bridge:
            FlaskBridge(app, engine=engine)

        @app.get("/")
        async def view(client: httpx.AsyncClient = client) -> dict[str, Any]:
            return (await client.get(f"{upstream.url}/kb/x")).json()  # type: ignore[no-any-return]

        test_client = app.test_client()
        assert test_client.get("/").status_code == 200
        if with_bridge:
            for _ in range(5):
                assert test_client.get("/").status_code == 200
            spawn(client.aclose()).result(10)
        else:
            with pytest.raises(RuntimeError, match="Event loop is closed"):
                test_client.get("/")
            # The first request's connection died with its loop and can't be closed
            # cleanly any more: collect it here, quietly, instead of in a later test.
            del app, view, test_client, client
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
        engine.close()


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_thousand_requests_reuse_upstream_connections(upstream: Upstream) -> None:
    """1,000 requests (500 sequential, 500 50-way concurrent) to the example app's async
    view under werkzeug: zero errors, each answer exact, and the module-level
    httpx.AsyncClient reused at most 20 upstream connections."""
    port = free_port()
    env = {
        "FLASK_EXAMPLE_STEP_TIME": "0.0005",
        "FLASK_EXAMPLE_RETRIEVAL_URL": f"{upstream.url}/kb",
    }
    args = [PYTHON, "-m", "flask", "--app", "examples.flask_app:create_app()", "run"]
    args += ["--port", "{port}", "--with-threads", "--no-reload"]
    generator = SimulatedGenerator()
    errors: list[str] = []

    def expected(question: str, topic: str) -> str:
        return generator.expected_text(f"notes on {topic}\n\nQ: {question}\nA:", 3)

    async def one(client: httpx.AsyncClient, n: int) -> None:
        question, topic = f"question {n}?", f"topic{n % 7}"
        payload = {"question": question, "topic": topic, "max_tokens": 3}
        reply = await client.post("/v1/answer", json=payload)
        if reply.status_code != 200:
            errors.append(f"{n}: {reply.status_code} {reply.text[:200]}")
        elif reply.json()["answer"] != expected(question, topic):
            errors.append(f"{n}: wrong answer {reply.json()!r}")

    async def drive(base: str) -> None:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            for n in range(500):
                await one(client, n)
            limiter = anyio.Semaphore(50)

            async def bounded(n: int) -> None:
                async with limiter:
                    await one(client, n)

            async with anyio.create_task_group() as tg:
                for n in range(500, 1000):
                    tg.start_soon(bounded, n)

    with run_server(args, port=free_port() if port is None else port, env=env) as server:
        anyio.run(drive, server.url)
    assert errors == []
    assert upstream.requests == 1000
    assert 1 <= len(upstream.ports) <= 20


@pytest.mark.timeout(30)
def test_async_views_write_nothing_into_asgiref_internals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Async views and hooks run on the background loop through asgiref's public API:
    nothing is written into asgiref's private SyncToAsync.threadlocal."""
    from asgiref import sync

    writes: list[str] = []

    class Recording(threading.local):
        def __setattr__(self, name: str, value: Any) -> None:
            writes.append(name)
            super().__setattr__(name, value)

    monkeypatch.setattr(sync.SyncToAsync, "threadlocal", Recording())
    app, engine = make_app()
    loops: list[asyncio.AbstractEventLoop] = []

    @app.before_request
    async def before() -> None:
        loops.append(asyncio.get_running_loop())

    @app.get("/")
    async def view() -> dict[str, int]:
        loops.append(asyncio.get_running_loop())
        return {"ok": 1}

    replies: list[Any] = []

    def requests() -> None:
        client = app.test_client()
        replies.extend(client.get("/").json for _ in range(3))

    thread = threading.Thread(target=requests)
    thread.start()
    thread.join(20)
    assert replies == [{"ok": 1}] * 3
    assert {id(loop) for loop in loops} == {id(background_loop())}
    assert writes == []
    engine.close()
