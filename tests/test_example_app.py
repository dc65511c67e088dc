"""examples/flask_app, the code people copy, served by a real werkzeug process: what it
fetches, and how it answers bad input and a bad upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmbridge._sansio.sse import SSEDecoder
from llmbridge.testing import SimulatedGenerator

from support import PYTHON, RecordingUpstream, Server, free_port, run_server

pytestmark = pytest.mark.timeout(60)

FLASK_RUN = [PYTHON, "-m", "flask", "--app", "examples.flask_app:create_app()", "run"]
FLASK_RUN += ["--port", "{port}", "--with-threads", "--no-reload"]
GENERATOR = SimulatedGenerator()


def serve(retrieval_url: str | None) -> Any:
    """The example app under werkzeug on a free port, retrieving from ``retrieval_url``."""
    env = {"FLASK_EXAMPLE_STEP_TIME": "0.001"}
    if retrieval_url is not None:
        env["FLASK_EXAMPLE_RETRIEVAL_URL"] = retrieval_url
    return run_server(FLASK_RUN, port=free_port(), env=env)


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def server(upstream: RecordingUpstream) -> Iterator[Server]:
    with serve(f"{upstream.url}/kb") as server:
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def assert_problem(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = reply.json()
    assert body["status"] == status
    assert body["detail"]
    return body


def test_answer_never_fetches_from_the_host_header() -> None:
    """Unconfigured, /v1/answer is a 503 saying what to set: it does not fetch from the
    URL a client's ``Host`` header names (a server-side request forgery pattern)."""
    with RecordingUpstream() as attacker, serve(None) as server:
        host = attacker.url.removeprefix("http://")
        with httpx.Client(base_url=server.url, timeout=30) as client:
            reply = client.post("/v1/answer", json={"question": "q?"}, headers={"Host": host})
        body = assert_problem(reply, 503)
        assert "FLASK_EXAMPLE_RETRIEVAL_URL" in body["detail"]
        assert attacker.requests == []


def test_answer_fetches_the_configured_upstream_whatever_the_host_header(
    client: httpx.Client, upstream: RecordingUpstream
) -> None:
    """Configured, the context comes from EXAMPLE_RETRIEVAL_URL even when the request's
    ``Host`` names somewhere else."""
    with RecordingUpstream() as attacker:
        host = attacker.url.removeprefix("http://")
        reply = client.post(
            "/v1/answer",
            json={"question": "why?", "topic": "streams", "max_tokens": 3},
            headers={"Host": host},
        )
        assert attacker.requests == []
    assert reply.status_code == 200, reply.text
    prompt = "notes on streams\n\nQ: why?\nA:"
    assert reply.json() == {
        "answer": GENERATOR.expected_text(prompt, 3),
        "context": "notes on streams",
    }
    assert upstream.requests[-1][0] == "/kb/streams"


@pytest.mark.parametrize(
    "topic", ["../healthz", "..", "a/b", "%2e%2e", "x?y=1", "x#y", "", " ", "é", "x" * 65, 7]
)
def test_topic_is_data_never_a_path(
    client: httpx.Client, upstream: RecordingUpstream, topic: object
) -> None:
    """A topic that isn't a short word is a 400 problem, and nothing is fetched: it can't
    walk to another route of the upstream (``../healthz`` used to, then 500 KeyError)."""
    before = len(upstream.requests)
    reply = client.post("/v1/answer", json={"question": "q?", "topic": topic})
    assert '"topic"' in assert_problem(reply, 400)["detail"]
    assert len(upstream.requests) == before


def test_a_missing_document_is_404(client: httpx.Client) -> None:
    """The upstream's 404 is the client's 404, as problem+json."""
    reply = client.post("/v1/answer", json={"question": "q?", "topic": "missing"})
    assert "missing" in assert_problem(reply, 404)["detail"]


@pytest.mark.parametrize("topic", ["broken", "nonsense", "notjson"])
def test_a_failing_upstream_is_502_and_reveals_nothing(client: httpx.Client, topic: str) -> None:
    """An upstream 500, a JSON answer without ``text`` and an HTML answer are each a 502
    problem that carries none of the upstream's text (it was a 500 KeyError page)."""
    reply = client.post("/v1/answer", json={"question": "q?", "topic": topic})
    assert_problem(reply, 502)
    assert RecordingUpstream.SECRET not in reply.text


def test_an_unreachable_upstream_is_502_and_reveals_nothing() -> None:
    """Nothing listening at the configured URL: 502 problem+json (it was a 500), and the
    client learns neither the internal address nor the exception."""
    port = free_port()  # free a moment ago: nothing listens there
    with serve(f"http://127.0.0.1:{port}/kb") as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            reply = client.post("/v1/answer", json={"question": "q?"})
        assert_problem(reply, 502)
        assert str(port) not in reply.text
        assert "ConnectError" not in reply.text
        assert "retrieval" in server.log()  # the cause is in the server's log


def test_query_string_integers_are_parsed(client: httpx.Client) -> None:
    """``GET /v1/stream?max_tokens=3&seed=7`` streams the seeded text of that length
    (a seed from a query string used to be always rejected)."""
    params = {"prompt": "hello", "max_tokens": "3", "seed": "7"}
    with client.stream("GET", "/v1/stream", params=params) as reply:
        assert reply.status_code == 200
        events = SSEDecoder().feed(reply.read())
    text = "".join(json.loads(e.data)["text"] for e in events if e.event == "message")
    assert text == GENERATOR.expected_text("hello", 3, seed=7)
    assert text != GENERATOR.expected_text("hello", 3)


TWO_LENGTHS = {"prompt": "x", "max_tokens": 2, "max_new_tokens": 3}


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (("GET", "/v1/stream", {"params": {"prompt": "x", "max_tokens": "-1"}}), "from 1 to"),
        (("POST", "/v1/complete", {"json": {"prompt": "x", "max_tokens": -1}}), "from 1 to"),
        (("POST", "/v1/complete", {"json": {"prompt": "x", "max_tokens": 10**9}}), "from 1 to"),
        (("GET", "/v1/stream", {"params": {"prompt": "x", "seed": "seven"}}), "integer"),
        (("POST", "/v1/complete", {"json": {"prompt": "x", "seed": -3}}), "from 0 to"),
        (("POST", "/v1/complete", {"json": {"prompt": "x", "max_tokenz": 3}}), "max_tokenz"),
        (("GET", "/v1/stream", {"params": {"prompt": "x", "tokens": "3"}}), "field 'tokens'"),
        (("POST", "/v1/complete", {"json": TWO_LENGTHS}), "not two different values"),
    ],
)
def test_bad_parameters_get_a_message_that_says_what_is_wrong(
    client: httpx.Client, request_: tuple[str, str, dict[str, Any]], words: str
) -> None:
    """Each mistake is a 400 problem whose detail names the actual problem: -1 is out of
    range (it used to say "must be an integer"), a misspelt field is refused, not ignored."""
    method, path, options = request_
    reply = client.request(method, path, **options)
    assert words in assert_problem(reply, 400)["detail"]


def test_complete_honours_max_new_tokens(client: httpx.Client) -> None:
    """``max_new_tokens``, the engine's own name, sets the length of /v1/complete's answer
    (it used to be silently ignored)."""
    reply = client.post("/v1/complete", json={"prompt": "hello", "max_new_tokens": 3})
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"] == GENERATOR.expected_text("hello", 3)
    assert reply.json()["usage"]["completion_tokens"] == 3


def test_messages_quote_a_huge_value_only_in_part(client: httpx.Client) -> None:
    """A megabyte-long bad value or field name is quoted in a short detail, not echoed."""
    huge = "9" * 1_000_000
    for body in ({"prompt": "x", "max_tokens": huge}, {"prompt": "x", huge: 1}):
        detail = assert_problem(client.post("/v1/complete", json=body), 400)["detail"]
        assert len(detail) < 300
