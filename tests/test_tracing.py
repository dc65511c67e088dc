"""OpenTelemetry spans, one per request, through real servers: parented to the incoming
traceparent, carrying the log line's fields. The apps export finished spans to a file
with the OpenTelemetry SDK."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from observe_apps import OPENAI_KEY

from support import PYTHON, free_port, run_server, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("server_kind", ["gunicorn-flask", "hypercorn-quart"])
def test_one_span_per_request_parented_to_traceparent(tmp_path: Path, server_kind: str) -> None:
    """A traced request's span continues the client's trace, is a server span named
    "POST /route", and holds the request id, status, tokens and timings; an untraced
    request starts a trace of its own."""
    trace_file = tmp_path / "spans.jsonl"
    if server_kind == "gunicorn-flask":
        args = [
            PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "1",
            "-b", "127.0.0.1:{port}", "observe_apps:flask_app()",
        ]  # fmt: skip
    else:
        args = [
            PYTHON, "-m", "hypercorn", "--bind", "127.0.0.1:{port}", "observe_apps:quart_app()"
        ]  # fmt: skip
    env = {"OBS_TRACE": str(trace_file)}
    with run_server(args, port=free_port(), env=env) as server, httpx.Client(timeout=30) as c:
        traced = c.post(
            f"{server.url}/sse",
            json={"prompt": "a"},
            headers={"traceparent": TRACEPARENT, "X-Request-Id": "traced-1"},
        )
        assert traced.status_code == 200
        failed = c.post(f"{server.url}/generate", json={"prompt": "b", "error_after": 0})
        assert failed.status_code == 502
        assert wait_until(lambda: len(spans(trace_file)) >= 2)
    first, second = spans(trace_file)
    assert first["name"] == "POST /sse"
    assert first["kind"] == "SpanKind.SERVER"
    assert first["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert first["parent_id"] == f"0x{PARENT_ID}"
    attributes = first["attributes"]
    assert attributes["llmbridge.request_id"] == "traced-1"
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.route"] == "/sse"
    assert attributes["llmbridge.completion_tokens"] == 4
    assert attributes["llmbridge.finish_reason"] == "length"
    assert 0 <= attributes["llmbridge.ttft_s"] <= attributes["llmbridge.total_s"]
    assert second["parent_id"] is None
    assert second["context"]["trace_id"] != f"0x{TRACE_ID}"
    assert second["attributes"]["http.response.status_code"] == 502
    assert second["status"]["status_code"] == "ERROR"
    assert second["attributes"]["llmbridge.request_id"] == failed.headers["X-Request-Id"]


def test_v1_spans_are_parented_and_carry_the_key_id(tmp_path: Path) -> None:
    """A `/v1` request's span continues the client's trace too, and names the caller by
    its key id (never the key)."""
    trace_file = tmp_path / "spans.jsonl"
    args = [
        PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "1",
        "-b", "127.0.0.1:{port}", "observe_apps:flask_app()",
    ]  # fmt: skip
    env = {"OBS_TRACE": str(trace_file)}
    with run_server(args, port=free_port(), env=env) as server, httpx.Client(timeout=30) as c:
        reply = c.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "llmbridge", "messages": [{"role": "user", "content": "hi"}]},
            headers={"traceparent": TRACEPARENT, "Authorization": f"Bearer {OPENAI_KEY}"},
        )
        assert reply.status_code == 200, reply.text
        assert wait_until(lambda: len(spans(trace_file)) >= 1)
    (span,) = spans(trace_file)
    assert span["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert span["parent_id"] == f"0x{PARENT_ID}"
    attributes = span["attributes"]
    assert attributes["llmbridge.request_id"] == reply.headers["X-Request-Id"]
    assert attributes["llmbridge.key_id"].startswith("key-")
    assert OPENAI_KEY not in json.dumps(span)
