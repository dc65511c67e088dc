"""``llmbridge migrate`` on examples/flask_app (a copy, made at test time): the migrated Quart
app, served by uvicorn, answers what the Flask original answers under werkzeug, request by
request: status, content type and body (a stream by the text it carries and its other
events, in order)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmbridge._sansio.sse import SSEDecoder

from support import PYTHON, ROOT, Server, free_port, run_server

pytestmark = pytest.mark.timeout(120)

ENV = {"FLASK_EXAMPLE_STEP_TIME": "0.001"}
FLASK_RUN = [PYTHON, "-m", "flask", "--app", "examples.flask_app:create_app()", "run"]
FLASK_RUN += ["--port", "{port}", "--with-threads", "--no-reload"]
QUART_RUN = [PYTHON, "-m", "uvicorn", "--factory", "flask_app:create_app", "--port", "{port}"]
QUART_RUN += ["--host", "127.0.0.1", "--log-level", "warning"]


def migrate(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "llmbridge", "migrate", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
    )


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/flask_app migrated by the command alone (``--write``)."""
    work = tmp_path_factory.mktemp("migrated")
    shutil.copytree(
        ROOT / "examples" / "flask_app",
        work / "flask_app",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    done = migrate("--write", "flask_app", cwd=work)
    assert done.returncode == 0, done.stderr
    return work


@pytest.fixture(scope="module")
def servers(migrated: Path) -> Iterator[tuple[Server, Server]]:
    with (
        run_server(FLASK_RUN, port=free_port(), env=ENV) as flask_server,
        run_server(QUART_RUN, port=free_port(), env=ENV, cwd=migrated) as quart_server,
    ):
        yield flask_server, quart_server


def test_the_migrated_example_is_quart_and_a_second_run_changes_nothing(migrated: Path) -> None:
    """The copy now imports Quart and QuartBridge; running the command again prints no diff
    and exits 0."""
    source = (migrated / "flask_app" / "app.py").read_text()
    assert "from quart import" in source
    assert "QuartBridge()" in source
    assert "from flask import" not in source
    assert "FlaskBridge" not in source
    again = migrate("flask_app", cwd=migrated)
    assert (again.returncode, again.stdout) == (0, "")


def answer(reply: httpx.Response) -> tuple[int, str, Any]:
    """What a client sees: status, media type, and the body with per-request ids dropped."""
    media = reply.headers.get("content-type", "").split(";")[0]
    if media == "text/event-stream":
        # How tokens are grouped into events depends on timing (a busy consumer gets more
        # per event): compare the text they carry and the other events, in order.
        events = SSEDecoder().feed(reply.content)
        text = "".join(json.loads(e.data)["text"] for e in events if e.event == "message")
        others = [(e.event, e.data) for e in events if e.event != "message"]
        body: Any = {"text": text, "events": others}
    elif media.endswith("json"):
        body = reply.json()
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k not in ("id", "request_id", "instance")}
    else:
        body = reply.text
    return reply.status_code, media, body


REQUESTS: list[Any] = [
    ("GET", "/healthz", {}),
    ("GET", "/", {}),
    ("GET", "/kb/engines", {}),
    ("GET", "/kb/nothing-here", {}),
    ("GET", "/no/such/page", {}),
    ("POST", "/v1/complete", {"json": {"prompt": "Hello", "max_tokens": 8, "seed": 7}}),
    ("POST", "/v1/complete", {"json": {"prompt": "Hello", "max_tokenz": 8}}),
    ("POST", "/v1/complete", {"content": b"[1, 2]"}),
    pytest.param(
        "POST",
        "/v1/complete",
        {"content": b"\xff{not json"},
        # Quart 0.22's get_json(silent=True) decodes the body as UTF-8 outside its silent
        # guard: a 500 where Flask answers None (and the app a 400). Strict: it tells when
        # Quart fixes it.
        marks=pytest.mark.xfail(strict=True, reason="Quart: get_json(silent=True) on non-UTF-8"),
    ),
    ("GET", "/v1/stream", {"params": {"prompt": "Hi", "max_tokens": "6", "seed": "3"}}),
    ("POST", "/v1/stream", {"json": {"prompt": "Hi there", "max_tokens": 5, "seed": 1}}),
    ("GET", "/v1/stream", {"params": {"prompt": "Hi", "max_tokens": "many"}}),
    ("POST", "/v1/answer", {"json": {"question": "What?", "topic": "engines"}}),
    ("POST", "/v1/tokens", {"json": {"text": "one two three"}}),
    ("PUT", "/v1/complete", {}),
]


@pytest.mark.parametrize(("method", "path", "options"), REQUESTS)
def test_the_migrated_app_answers_as_the_original(
    servers: tuple[Server, Server], method: str, path: str, options: dict[str, Any]
) -> None:
    """Same status, media type and body from the Flask app (werkzeug) and its migration
    (uvicorn), streams included; a client's X-Request-Id comes back from both."""
    headers = {"X-Request-Id": "compare-1"}
    answers = []
    for server in servers:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            reply = client.request(method, path, headers=headers, **options)
        answers.append(answer(reply))
        if path in ("/v1/complete", "/v1/stream") and reply.status_code == 200:
            assert reply.headers["x-request-id"] == "compare-1"
    flask_answer, quart_answer = answers
    assert quart_answer == flask_answer
    if path == "/v1/stream" and flask_answer[0] == 200:
        assert len(flask_answer[2]["text"]) > 10  # a real stream was compared
        assert flask_answer[2]["events"][-1][0] == "done"
