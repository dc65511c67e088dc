"""examples/demo.py, the README's demo command, run as a real process."""

from __future__ import annotations

import json
import signal

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
