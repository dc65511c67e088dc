"""One structured log line per request, and one request id end to end, through real
servers: gunicorn (Flask, threads), uvicorn (Flask through llmbridge.asgi), hypercorn
(Quart). The apps write the ``llmbridge.request`` lines as JSON to a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from observe_apps import OPENAI_KEY

from llmbridge._sansio.keys import key_id
from llmbridge._sansio.sse import SSEDecoder

from support import PYTHON, free_port, run_server, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_lines(path: Path, count: int) -> list[dict[str, Any]]:
    assert wait_until(lambda: len(lines(path)) >= count), lines(path)
    return lines(path)


def gunicorn_flask(env: dict[str, str]) -> Any:
    args = [
        PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-w", "1",
        "-b", "127.0.0.1:{port}", "observe_apps:flask_app()",
    ]  # fmt: skip
    return run_server(args, port=free_port(), env=env)


def uvicorn_asgi(env: dict[str, str]) -> Any:
    args = [
        PYTHON, "-m", "uvicorn", "--factory", "observe_apps:asgi_app",
        "--host", "127.0.0.1", "--port", "{port}",
    ]  # fmt: skip
    return run_server(args, port=free_port(), env=env)


def hypercorn_quart(env: dict[str, str]) -> Any:
    args = [PYTHON, "-m", "hypercorn", "--bind", "127.0.0.1:{port}", "observe_apps:quart_app()"]
    return run_server(args, port=free_port(), env=env)


def check_timings(line: dict[str, Any]) -> None:
    assert 0 <= line["queue_s"] <= line["ttft_s"] <= line["total_s"], line


def test_flask_under_gunicorn_one_json_line_per_request(tmp_path: Path) -> None:
    """A whole answer, a stream and a failure each give one line at their end, with id,
    route, status, times, tokens, finish reason, cancelled, policy flags and the key id
    an authentication layer set; requests that don't use the bridge give none."""
    log = tmp_path / "requests.log"
    with gunicorn_flask({"OBS_LOG": str(log)}) as server, httpx.Client(timeout=30) as client:
        headers = {"X-Request-Id": "rid-1", "X-Key-Id": "key-7"}
        whole = client.post(f"{server.url}/generate", json={"prompt": "a"}, headers=headers)
        assert whole.status_code == 200
        streamed = client.post(f"{server.url}/sse", json={"prompt": "b"})
        assert SSEDecoder().feed(streamed.content)[-1].event == "done"
        failed = client.post(f"{server.url}/generate", json={"prompt": "c", "error_after": 0})
        assert failed.status_code == 502
        assert client.get(f"{server.url}/seen").status_code == 200
        assert client.get(f"{server.url}/metrics").status_code == 200
        first, second, third = wait_lines(log, 3)
    assert len(lines(log)) == 3
    assert first["logger"] == "llmbridge.request"
    assert first["level"] == "INFO"
    assert first["request_id"] == "rid-1" == whole.headers["X-Request-Id"]
    assert (first["method"], first["route"], first["status"]) == ("POST", "/generate", 200)
    assert first["completion_tokens"] == 4
    assert first["finish_reason"] == "length"
    assert first["cancelled"] is False
    assert first["key_id"] == "key-7"
    assert (first["cache_hit"], first["coalesced"], first["rate_limited"]) == (False,) * 3
    check_timings(first)
    assert second["route"] == "/sse"
    assert second["status"] == 200
    assert second["completion_tokens"] == 4
    assert second["request_id"] == streamed.headers["X-Request-Id"]
    assert second["key_id"] is None
    check_timings(second)
    assert third["status"] == 502
    assert third["finish_reason"] == "error"
    assert third["request_id"] == failed.headers["X-Request-Id"] == failed.json()["request_id"]


def test_cancelled_stream_is_logged_as_cancelled(tmp_path: Path) -> None:
    """A client that leaves mid-stream: the line comes when the server notices, with
    cancelled true."""
    log = tmp_path / "requests.log"
    with gunicorn_flask({"OBS_LOG": str(log)}) as server, httpx.Client(timeout=30) as client:
        body = {"prompt": "long", "max_new_tokens": 1_000_000}
        with client.stream("POST", f"{server.url}/sse", json=body) as response:
            assert response.status_code == 200
            next(response.iter_bytes())
        (line,) = wait_lines(log, 1)
    assert line["cancelled"] is True
    assert line["finish_reason"] == "cancelled"
    assert line["request_id"] == response.headers["X-Request-Id"]
    assert line["completion_tokens"] >= 1


def test_one_request_id_end_to_end_under_uvicorn(tmp_path: Path) -> None:
    """Through llmbridge.asgi under uvicorn, a client's X-Request-Id is the id in the
    response header, the problem body, the backend job and the log line."""
    log = tmp_path / "requests.log"
    with uvicorn_asgi({"OBS_LOG": str(log)}) as server, httpx.Client(timeout=30) as client:
        ok = client.post(
            f"{server.url}/sse", json={"prompt": "a"}, headers={"X-Request-Id": "e2e-1"}
        )
        assert ok.status_code == 200
        assert SSEDecoder().feed(ok.content)[-1].event == "done"
        bad = client.post(
            f"{server.url}/sse",
            json={"prompt": "b", "error_after": 0},
            headers={"X-Request-Id": "e2e-2"},
        )
        assert bad.status_code == 502
        assert bad.headers["content-type"] == "application/problem+json"
        seen = client.get(f"{server.url}/seen").json()["ids"]
        logged = {line["request_id"]: line for line in wait_lines(log, 2)}
    assert ok.headers["X-Request-Id"] == "e2e-1"
    assert bad.headers["X-Request-Id"] == "e2e-2" == bad.json()["request_id"]
    assert seen == ["e2e-1", "e2e-2"]
    assert logged["e2e-1"]["status"] == 200
    # The view returned a stream; the adapter answered its early failure with a 502.
    assert logged["e2e-2"]["status"] == 502
    assert logged["e2e-2"]["finish_reason"] == "error"


def test_openai_routes_log_one_line_per_request(tmp_path: Path) -> None:
    """/v1: a whole answer, a stream and an invalid body each give one line, with the
    caller's key id."""
    log = tmp_path / "requests.log"
    chat = {"model": "llmbridge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with gunicorn_flask({"OBS_LOG": str(log)}) as server, httpx.Client(timeout=30) as client:
        url = f"{server.url}/v1/chat/completions"
        client.headers["Authorization"] = f"Bearer {OPENAI_KEY}"
        whole = client.post(url, json=chat, headers={"X-Request-Id": "oa-1"})
        assert whole.status_code == 200, whole.text
        streamed = client.post(url, json={**chat, "stream": True})
        assert streamed.status_code == 200
        assert b"[DONE]" in streamed.content
        invalid = client.post(url, content=b"{not json")
        assert invalid.status_code == 400
        logged = wait_lines(log, 3)
    assert len(logged) == 3
    by_status = sorted(logged, key=lambda line: (line["status"], line["request_id"] or ""))
    assert [line["status"] for line in by_status] == [200, 200, 400]
    ids = {line["request_id"] for line in logged}
    assert "oa-1" in ids
    assert streamed.headers["X-Request-Id"] in ids
    for line in by_status[:2]:
        assert line["key_id"] == key_id(OPENAI_KEY)  # the principal, never the key
        assert line["route"] == "/chat/completions"
        assert line["completion_tokens"] == 3
        check_timings(line)


def test_quart_under_hypercorn_logs_policy_outcomes(tmp_path: Path) -> None:
    """QuartBridge over a Pipeline: a cache hit says cache_hit, a refusal by the rate
    limiter says rate_limited with status 429."""
    log = tmp_path / "requests.log"
    env = {"OBS_LOG": str(log), "OBS_PIPELINE": "1"}
    with hypercorn_quart(env) as server, httpx.Client(timeout=30) as client:
        statuses = []
        for prompt in ("same", "same", "x1", "x2", "x3", "x4"):
            response = client.post(f"{server.url}/generate", json={"prompt": prompt})
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        assert statuses[:2] == [200, 200]
        assert statuses[-1] == 429, statuses
        logged = wait_lines(log, len(statuses))
    assert len(logged) == len(statuses)
    assert logged[0]["cache_hit"] is False
    assert logged[1]["cache_hit"] is True
    assert logged[1]["finish_reason"] == "length"
    refused = logged[-1]
    assert refused["status"] == 429
    assert refused["rate_limited"] is True
    assert refused["route"] == "/generate"
