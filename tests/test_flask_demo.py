"""examples/demo.py, the README's demo command, run as a real process."""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import httpx
import pytest

from llmbridge._sansio.sse import SSEDecoder
from llmbridge.testing import SimulatedGenerator

from support import PYTHON, ROOT, free_port, run_server, wait_until


@pytest.mark.timeout(90)
def test_demo_serves_the_example_app_and_stops_on_ctrl_c() -> None:
    """The demo prints its URL, serves the page, JSON, SSE and the async view, streams
    its own preview side by side, and exits 0 on Ctrl-C."""
    args = [PYTHON, str(ROOT / "examples" / "demo.py"), "--port", "{port}"]
    generator = SimulatedGenerator()
    port = free_port()
    with run_server(args, port=port) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            page = client.get("/")
            assert page.status_code == 200
            assert "EventSource" in page.text
            reply = client.post("/v1/complete", json={"prompt": "demo", "max_tokens": 4})
            assert reply.json()["text"] == generator.expected_text("demo", 4)
            with client.stream("GET", "/v1/stream", params={"prompt": "sse", "max_tokens": 3}) as r:
                events = SSEDecoder().feed(r.read())
            text = "".join(json.loads(e.data)["text"] for e in events if e.event == "message")
            assert text == generator.expected_text("sse", 3)
            assert events[-1].event == "done"
            answer = client.post("/v1/answer", json={"question": "why?", "max_tokens": 2})
            assert answer.status_code == 200
        # The demo's own preview runs alongside; let it finish before stopping.
        assert wait_until(lambda: "concurrent streams" in server.log(), timeout=30)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(30) == 0
        log = server.log()
    assert f"serving the Flask example app on http://127.0.0.1:{port}/" in log
    assert "3 concurrent streams" in log
    assert "llmbridge demo: stopped" in log
    assert "Traceback" not in log


def stream_in_thread(
    url: str, max_tokens: int
) -> tuple[threading.Thread, threading.Event, list[Any]]:
    """Read one SSE stream on a thread; the event is set once its first chunk arrived.
    The list gets the decoded events once the stream ended (or the exception)."""
    started = threading.Event()
    out: list[Any] = []

    def read() -> None:
        decoder, events = SSEDecoder(), []
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                params = {"prompt": "drain me", "max_tokens": max_tokens}
                with client.stream("GET", "/v1/stream", params=params) as reply:
                    for raw in reply.iter_raw():
                        events += decoder.feed(raw)
                        if any(e.event == "message" for e in events):
                            started.set()
        except httpx.HTTPError as exc:
            out.append(exc)
        out.extend(events)
        started.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, started, out


DEMO = [PYTHON, "-m", "llmbridge", "demo", "--port", "{port}", "--no-preview"]


@pytest.mark.timeout(90)
def test_first_ctrl_c_drains_the_open_streams() -> None:
    """The first Ctrl-C says how many streams it waits for, refuses new connections,
    lets the open stream finish with all its text, and exits 0."""
    with run_server([*DEMO, "--step-time", "0.1"], port=free_port()) as server:
        thread, started, events = stream_in_thread(server.url, 30)
        assert started.wait(30)
        server.proc.send_signal(signal.SIGINT)
        assert wait_until(lambda: "draining" in server.log(), timeout=10)
        assert thread.is_alive()  # still streaming: the drain waits for it
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/healthz", timeout=5)
        thread.join(60)
        assert server.proc.wait(30) == 0
        log = server.log()
    assert "llmbridge demo: draining 1 stream (Ctrl-C again to stop now)" in log
    text = "".join(json.loads(e.data)["text"] for e in events if e.event == "message")
    assert text == SimulatedGenerator().expected_text("drain me", 30)
    assert events[-1].event == "done"
    assert "llmbridge demo: stopped" in log
    assert "Traceback" not in log


@pytest.mark.timeout(90)
def test_second_ctrl_c_stops_at_once_without_a_traceback() -> None:
    """A stream of 4,096 tokens would take minutes: the second Ctrl-C ends it with a
    final error event, and the demo exits 130 with no traceback."""
    with run_server([*DEMO, "--step-time", "0.05"], port=free_port()) as server:
        thread, started, events = stream_in_thread(server.url, 4096)
        assert started.wait(30)
        server.proc.send_signal(signal.SIGINT)
        assert wait_until(lambda: "Ctrl-C again to stop now" in server.log(), timeout=10)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(15) == 130
        thread.join(15)
        log = server.log()
    assert not thread.is_alive()
    assert "llmbridge demo: stopping now: ending 1 open stream" in log
    assert "Traceback" not in log
    assert "KeyboardInterrupt" not in log
    assert events, "the stream got nothing"
    assert events[-1].event == "error", events[-3:]
    assert len([e for e in events if e.event == "message"]) < 4096
