"""OpenAIBackend over a Unix socket: ``llmbridge serve host_apps:engine --socket PATH``
in a real subprocess, reached by an ``OpenAIBackend(..., uds=PATH)`` inside a local
engine, through its OpenAI ``/v1`` surface (the same client reaches vLLM over TCP)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_host import EngineServer, engine_server

from llmbridge import Cancelled, Engine
from llmbridge.backends import OpenAIBackend, Upstream
from llmbridge.openai import render_messages
from llmbridge.testing import SimulatedGenerator

pytestmark = pytest.mark.timeout(90)

EXPECTED = SimulatedGenerator(max_new_tokens=16)
MESSAGES = [{"role": "user", "content": "hello over a socket"}]


@pytest.fixture(scope="module")
def server() -> Iterator[EngineServer]:
    with engine_server() as server:
        yield server


def backend_for(server: EngineServer, **options: object) -> OpenAIBackend:
    # The host part only names the server in the Host header: the socket is the route.
    return OpenAIBackend("http://localhost/v1", uds=server.socket, model="llmbridge", **options)  # type: ignore[arg-type]


def test_streamed_and_whole_chat_and_completions_over_the_socket(server: EngineServer) -> None:
    """Chat streamed and not, and a completion, come back exact from the engine process."""
    prompt = render_messages(MESSAGES)
    with Engine(backend_for(server)) as engine:
        chunks = list(engine.chat(MESSAGES, max_new_tokens=6))
        whole = engine.chat(MESSAGES, max_new_tokens=5, stream=False).result(20)
        completion = engine.submit("plain prompt", max_new_tokens=4).result(20)
    assert "".join(chunks) == EXPECTED.expected_text(prompt, 6)
    assert len(chunks) >= 2  # streamed from the engine process, not one answer at the end
    assert whole.text == EXPECTED.expected_text(prompt, 5)
    assert whole.completion_tokens == 5
    assert whole.finish_reason == "length"
    assert completion.text == EXPECTED.expected_text("plain prompt", 4)


def test_cancelling_reaches_the_engine_process(server: EngineServer) -> None:
    """Closing the local stream closes the socket's response: the engine process cancels
    its job before another step holds it."""
    with Engine(backend_for(server)) as engine:
        stream = engine.chat(MESSAGES, max_new_tokens=2000)
        reader = iter(stream)
        for _ in range(3):
            next(reader)
        lines = server.wait_for(lambda ls: any(line.get("ids") for line in ls))
        job = next(line for line in reversed(lines) if line.get("ids"))["ids"][0]
        reader.close()  # type: ignore[attr-defined]
        with pytest.raises(Cancelled):
            stream.result(5)
        lines = server.wait_for(lambda ls: any(x.get("cancelled") == job for x in ls))
    cancelled = next(x for x in lines if x.get("cancelled") == job)
    later = [x for x in lines if job in x.get("ids", ()) and x["step"] > cancelled["step"]]
    assert later == []


def test_a_socket_upstream_among_others_and_its_label(server: EngineServer) -> None:
    """``Upstream(url, uds=...)`` works in ``upstreams=[...]``; its metrics label names
    the socket, and a path-like socket is accepted."""
    upstream = Upstream("http://localhost/v1", uds=Path(server.socket))
    assert upstream.uds == server.socket
    assert upstream.label == f"http://localhost/v1 (unix:{server.socket})"
    backend = OpenAIBackend(upstreams=[upstream], model="llmbridge")
    with Engine(backend) as engine:
        assert engine.submit("via list", max_new_tokens=3).result(20).text == (
            EXPECTED.expected_text("via list", 3)
        )


@pytest.mark.parametrize(
    "url",
    ["unix:///run/llmbridge.sock", "unix:/run/llmbridge.sock", "http+unix://%2Frun%2Fx.sock/v1"],
)
def test_unix_urls_are_refused_with_the_form_to_use(url: str) -> None:
    """A ``unix:`` URL is a clear ValueError that shows the ``uds=`` form."""
    with pytest.raises(ValueError, match=r"uds='/path/to.sock'"):
        Upstream(url)
    with pytest.raises(ValueError, match=r"uds="):
        OpenAIBackend(url)


@pytest.mark.parametrize("uds", ["", 3, b"/run/x.sock", "/run/x\0.sock"])
def test_bad_socket_paths_are_refused(uds: object) -> None:
    """A socket must be a non-empty str path (or path-like)."""
    with pytest.raises(ValueError, match="uds must be the path of a Unix socket"):
        Upstream("http://localhost/v1", uds=uds)  # type: ignore[arg-type]


def test_uds_with_upstreams_list_is_refused(tmp_path: Path) -> None:
    """With ``upstreams=[...]`` each Upstream names its own socket."""
    with pytest.raises(ValueError, match="give each Upstream its own uds"):
        OpenAIBackend(upstreams=["http://localhost/v1"], uds=os.fspath(tmp_path / "s.sock"))
