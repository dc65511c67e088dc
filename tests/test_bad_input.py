"""A bad-input corpus against real servers: never a 500, never a non-JSON error, never a hang.

The corpus is generated: malformed JSON, every field with every wrong type, huge and
negative numbers, deep nesting, lone surrogates, NUL/CR/LF, bodies over the limit, wrong
content types, wrong methods and unknown URLs. It runs against the OpenAI routes on
gunicorn (gthread), on uvicorn through ``llmbridge.asgi`` and on Quart (hypercorn), and
against the example Flask app (``examples/flask_app``) on gunicorn and uvicorn. One server
per kind serves its whole corpus; requests go 8 at a time.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from openai_servers import serve

from support import PYTHON, Server, free_port, run_server

#: Values that are wrong (or odd) for most fields.
ODD: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    -1e308,
    10**30,
    -(10**30),
    "",
    "x",
    "\x00",
    "a\r\nb",
    [],
    [1],
    {},
    {"a": 1},
]


@dataclass(frozen=True)
class Case:
    """One request of the corpus."""

    method: str
    path: str
    content: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False

    def label(self) -> str:
        return f"{self.method} {self.path} {self.content[:80]!r}"


def _json_case(path: str, body: Any, **headers: str) -> Case:
    return Case("POST", path, json.dumps(body).encode(), {"content-type": "application/json"})


def _raw(path: str, raw: bytes, content_type: str = "application/json") -> Case:
    return Case("POST", path, raw, {"content-type": content_type})


def _fields(path: str, base: dict[str, Any], names: list[str]) -> Iterator[Case]:
    """Every field of ``names`` set to every :data:`ODD` value, and removed."""
    for name in names:
        without = {k: v for k, v in base.items() if k != name}
        yield _json_case(path, without)
        for value in ODD:
            yield _json_case(path, {**base, name: value})


def _hostile_bodies(path: str) -> Iterator[Case]:
    """Bodies that break parsers rather than validators."""
    for raw in (
        b"",
        b" ",
        b"{",
        b"[",
        b"nul",
        b'{"a":}',
        b'{"model": "sim",}',
        b"\xff\xfe\x00",
        b'{"model": "sim"} trailing',
        b"NaN",
        b'{"prompt": NaN, "model": "sim"}',
        b'{"max_tokens": ' + b"9" * 5000 + b', "model": "sim", "prompt": "x"}',
        b'"just a string"',
        b"12",
        b"null",
        b"[" * 1200 + b"]" * 1200,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "sim", "prompt": "x", "stop": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"model": "sim", "messages": [{"role": "user", "content": "x", "extra": '
        + b"{" * 2000
        + b"}" * 2000
        + b"}]}",
        b'{"model": "\\ud800", "prompt": "x"}',
        b'{"model": "sim", "prompt": "\\udc00"}',
        b'{"\\ud800": 1, "model": "sim", "prompt": "x"}',
        b'{"model": "sim", "messages": [{"role": "user", "content": "\\ud800x"}]}',
        b'{"model": "sim", "prompt": "x", "stop": ["\\udfff"]}',
        b'{"model": "si\\u0000m", "prompt": "x"}',
        b'{"model": "sim\\r\\nX-Injected: 1", "prompt": "x"}',
        b'{"model": "sim", "prompt": "a\\u0000b\\r\\nc", "max_tokens": 2}',
    ):
        yield _raw(path, raw)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        yield _raw(path, b'{"model": "sim", "prompt": "x", "max_tokens": 2}', content_type)
        yield _raw(path, b"model=sim&prompt=x", content_type)
    yield Case("POST", path, b'{"model": "sim", "prompt": "x"}')  # no content type
    big = b'{"model": "sim", "prompt": "' + b"x" * (3 << 20) + b'"}'
    # A server may close the connection after refusing a body it didn't read: don't
    # reuse that connection for the next case.
    headers = {"content-type": "application/json", "connection": "close"}
    yield Case("POST", path, big, headers)
    yield Case("POST", path, big, headers, chunked=True)


def _methods(paths: list[str]) -> Iterator[Case]:
    for path in paths:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            yield Case(method, path)


def openai_corpus() -> list[Case]:
    """Requests for the OpenAI routes under ``/v1``."""
    chat: dict[str, Any] = {
        "model": "sim",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    }
    completion: dict[str, Any] = {"model": "sim", "prompt": "hi", "max_tokens": 3}
    common = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n"]
    common += ["stop", "stream", "stream_options", "seed"]
    cases = [
        *_fields("/v1/chat/completions", chat, ["messages", *common]),
        *_fields("/v1/completions", completion, ["prompt", *common]),
    ]
    for value in ODD:
        cases.append(_json_case("/v1/chat/completions", {**chat, "messages": [value]}))
        for key in ("role", "content"):
            message = {"role": "user", "content": "hi", key: value}
            cases.append(_json_case("/v1/chat/completions", {**chat, "messages": [message]}))
        part = [{"type": "text", "text": value}, value]
        message = {"role": "user", "content": part}
        cases.append(_json_case("/v1/chat/completions", {**chat, "messages": [message]}))
    for number in (10**400, -(10**400), 2**63, 2**64, -(2**63) - 1, 1e308, -1e-308):
        for name in ("max_tokens", "seed", "temperature"):
            cases.append(_json_case("/v1/completions", {**completion, name: number}))
    for path in ("/v1/chat/completions", "/v1/completions"):
        cases += _hostile_bodies(path)
    cases += _methods(["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/sim"])
    cases += _methods(["/v1", "/v1/", "/v1/nope", "/v1/models/%00", "/v1/embeddings"])
    return cases


def example_corpus() -> list[Case]:
    """Requests for the example Flask app's routes."""
    cases: list[Case] = []
    cases += _fields("/v1/complete", {"prompt": "hi", "max_tokens": 3}, ["prompt", "max_tokens"])
    cases += _fields("/v1/complete", {"prompt": "hi", "max_tokens": 3}, ["seed"])
    cases += _fields("/v1/stream", {"prompt": "hi", "max_tokens": 3}, ["prompt", "max_tokens"])
    cases += _fields("/v1/answer", {"question": "why", "max_tokens": 3}, ["question", "topic"])
    cases += _fields("/v1/tokens", {"text": "a b c"}, ["text"])
    for topic in ("../stats", "../../healthz", "x/y", "..", "%2e%2e", "streams?x=1", "a" * 5000):
        cases.append(_json_case("/v1/answer", {"question": "why", "topic": topic}))
    for query in ("", "?prompt=", "?prompt=hi&max_tokens=x", "?prompt=hi&max_tokens=-1"):
        cases.append(Case("GET", "/v1/stream" + query))
    # Past Python's 4,300-digit int limit (in the body: a request line that long is the
    # server's own 414 before any app runs).
    cases.append(Case("GET", "/v1/stream?prompt=hi&max_tokens=" + "9" * 1000))
    cases.append(_json_case("/v1/complete", {"prompt": "hi", "max_tokens": "9" * 4400}))
    for path in ("/v1/complete", "/v1/stream", "/v1/answer"):
        cases += _hostile_bodies(path)
    cases += _methods(["/v1/complete", "/v1/answer", "/v1/tokens", "/stats", "/healthz"])
    cases += _methods(["/nope", "/kb/nope", "/kb/%00", "/v1/nope"])
    return cases


def _send(http: httpx.Client, case: Case) -> str | None:
    """What is wrong with the server's answer to ``case`` (``None``: nothing)."""
    content: Any = case.content or None
    if case.chunked:
        data = case.content
        content = iter([data[i : i + 65536] for i in range(0, len(data), 65536)])
    try:
        with http.stream(case.method, case.path, content=content, headers=case.headers) as r:
            body = r.read()
    except httpx.TimeoutException:
        return f"hung over 10 s: {case.label()}"
    except httpx.TransportError as exc:
        return f"{type(exc).__name__}: {case.label()}"
    if r.status_code >= 500:
        return f"{r.status_code}: {case.label()}: {body[:200]!r}"
    if r.status_code >= 400:
        kind = r.headers.get("content-type", "")
        if not kind.startswith(("application/json", "application/problem+json")):
            return f"{r.status_code} as {kind!r}: {case.label()}: {body[:120]!r}"
        try:
            json.loads(body)
        except ValueError:
            return f"{r.status_code} with a body that is not JSON: {case.label()}"
    return None


def _run(server: Server, cases: list[Case]) -> list[str]:
    timeout = httpx.Timeout(10.0)
    limits = httpx.Limits(max_connections=8)
    with (
        httpx.Client(base_url=server.url, timeout=timeout, limits=limits) as http,
        ThreadPoolExecutor(8) as pool,
    ):
        outcomes = list(pool.map(lambda case: _send(http, case), cases))
    return [outcome for outcome in outcomes if outcome is not None]


@pytest.mark.parametrize("kind", ["gunicorn", "uvicorn", "hypercorn"])
@pytest.mark.timeout(180)
def test_openai_routes_answer_every_bad_request_with_json_and_no_500(kind: str) -> None:
    """/v1 on gunicorn gthread, uvicorn + to_asgi and Quart: over 300 hostile requests,
    0 answers with status >= 500, 0 error bodies that aren't JSON, 0 hangs over 10 s."""
    cases = openai_corpus()
    assert len(cases) >= 300
    with serve(kind, {"SIM_STEP_TIME": "0.001"}) as server:
        failures = _run(server, cases)
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:40])


@contextlib.contextmanager
def _example(kind: str) -> Iterator[Server]:
    port = free_port()
    if kind == "gunicorn":
        args = [PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-w", "1"]
        args += ["-b", "127.0.0.1:{port}", "examples.flask_app.app:create_app()"]
    else:
        args = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}"]
        args += ["--no-access-log", "examples.asgi_app:app"]
    env = {
        "FLASK_EXAMPLE_STEP_TIME": "0.001",
        "FLASK_EXAMPLE_TOKENIZER_DELAY": "0.001",
        "FLASK_EXAMPLE_RETRIEVAL_URL": f"http://127.0.0.1:{port}/kb",  # its own documents
    }
    with run_server(args, port=port, env=env) as server:
        yield server


@pytest.mark.parametrize("kind", ["gunicorn", "uvicorn"])
@pytest.mark.timeout(180)
def test_example_app_answers_every_bad_request_with_json_and_no_500(kind: str) -> None:
    """The example Flask app on gunicorn gthread and uvicorn + to_asgi: the same corpus
    shape for its routes, the same three zeros."""
    cases = example_corpus()
    assert len(cases) >= 300
    with _example(kind) as server:
        failures = _run(server, cases)
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:40])
