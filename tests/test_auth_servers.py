"""API keys on the /v1 routes, through real servers: gunicorn gthread (Flask), uvicorn via
``llmbridge.asgi.to_asgi`` (Flask) and uvicorn (Quart); the official ``openai`` SDK and
LangChain's ``ChatOpenAI``; per-key limits shared by two processes over Redis; and a
grep of everything the servers produced for the keys.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmbridge._sansio.keys import key_id

from support import PYTHON, Server, free_port, run_server, start_redis_server

pytestmark = pytest.mark.timeout(120)

KEY = "sk-live-" + secrets.token_urlsafe(24)
OTHER = "sk-live-" + secrets.token_urlsafe(24)
# Same length as KEY, same prefix but the last character; and a longer one.
NEAR = KEY[:-1] + ("A" if KEY[-1] != "A" else "B")
LONGER = KEY + "x"
CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}

SERVERS = {
    "gunicorn-gthread": (
        "flask",
        [
            PYTHON,
            "-m",
            "gunicorn",
            "-k",
            "gthread",
            "--threads",
            "8",
            "-w",
            "1",
            "-b",
            "127.0.0.1:{port}",
            "auth_apps:app",
        ],
    ),
    "uvicorn-to_asgi": (
        "flask",
        [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "auth_apps:asgi"],
    ),
    "quart-uvicorn": (
        "quart",
        [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "auth_apps:app"],
    ),
}


def write_keys(path: Path, text: str) -> None:
    """Replace the key file in one step (a new inode), as an operator's deploy would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def serve(
    name: str, keys_file: Path, *, redis: str | None = None, mode: str = "file"
) -> Iterator[Server]:
    """The server ``name`` over the auth test app reading ``keys_file``."""
    kind, args = SERVERS[name]
    env = {"AUTH_APP": kind, "AUTH_MODE": mode, "AUTH_KEYS_FILE": str(keys_file)}
    if redis is not None:
        env["AUTH_REDIS"] = redis
    with run_server(args, port=free_port(), env=env) as server:
        yield server


def assert_refused(response: httpx.Response) -> None:
    """A 401 in OpenAI's shape that names no key."""
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert "sk-" not in response.text


@pytest.mark.parametrize("name", list(SERVERS))
def test_keys_through_real_servers(name: str, tmp_path: Path) -> None:
    """No key, a wrong key of the same length, a longer key, a key of another scheme:
    each a 401 with one and the same body; a valid key streams and answers; a key
    removed from the file is refused on the next request, without a restart."""
    keys = tmp_path / "keys.txt"
    write_keys(keys, f"# the team's keys\n{KEY} name=team\n{OTHER}\n")
    with serve(name, keys) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        url = "/v1/chat/completions"
        refusals = [
            client.post(url, json=CHAT),
            client.post(url, json=CHAT, headers={"Authorization": f"Bearer {NEAR}"}),
            client.post(url, json=CHAT, headers={"Authorization": f"Bearer {LONGER}"}),
            client.post(url, json=CHAT, headers={"Authorization": f"Bearer {KEY[:8]}"}),
            client.post(url, json=CHAT, headers={"Authorization": f"Basic {KEY}"}),
            client.get("/v1/models"),
            client.get("/v1/no-such-route"),  # no route discovery without a key
        ]
        for response in refusals:
            assert_refused(response)
        assert len({r.content for r in refusals}) == 1  # nothing tells the causes apart

        good = {"Authorization": f"Bearer {KEY}"}
        answer = client.post(url, json=CHAT, headers=good)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        assert client.get("/v1/models", headers=good).json()["data"][0]["id"] == "sim"
        with client.stream("POST", url, json={**CHAT, "stream": True}, headers=good) as stream:
            assert stream.status_code == 200
            assert stream.read().rstrip().endswith(b"data: [DONE]")
        lower = {"Authorization": f"bearer {OTHER}"}  # the scheme is case-insensitive
        assert client.post(url, json=CHAT, headers=lower).status_code == 200

        write_keys(keys, f"{OTHER}\n")  # revoke KEY
        assert_refused(client.post(url, json=CHAT, headers=good))
        assert client.post(url, json=CHAT, headers=lower).status_code == 200
        server.terminate()  # its whole output, flushed
        log = server.log()
    assert KEY not in log
    assert OTHER not in log
    assert "API keys reloaded" in log


@pytest.mark.parametrize("name", ["gunicorn-gthread", "quart-uvicorn"])
def test_openai_sdk_and_langchain_with_api_key(name: str, tmp_path: Path) -> None:
    """The official SDK and LangChain's ChatOpenAI, given ``api_key=``, work unchanged;
    a wrong key is the SDK's AuthenticationError."""
    import openai
    from langchain_openai import ChatOpenAI

    keys = tmp_path / "keys.txt"
    write_keys(keys, f"{KEY}\n")
    with serve(name, keys) as server:
        base = f"{server.url}/v1"
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=30)
        whole = client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert whole.choices[0].message.content
        parts = client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        assert [m.id for m in client.models.list()] == ["sim"]
        wrong = openai.OpenAI(base_url=base, api_key=NEAR, max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.models.list()
        assert refused.value.code == "invalid_api_key"

        chat = ChatOpenAI(base_url=base, api_key=KEY, model="sim", max_retries=0, timeout=30)
        assert chat.invoke("hello").content
        assert "".join(str(chunk.content) for chunk in chat.stream("hello"))
        bad = ChatOpenAI(base_url=base, api_key=NEAR, model="sim", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            bad.invoke("hello")
        server.terminate()
        log = server.log()
    assert KEY not in log
    assert NEAR not in log


@pytest.fixture
def redis_url() -> Iterator[str]:
    proc, url = start_redis_server()
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_per_key_limits_hold_across_two_processes(tmp_path: Path, redis_url: str) -> None:
    """Two server processes sharing Redis share each key's own limits: ``rpm=3`` admits
    three requests in all, then both answer 429 with Retry-After; a key with a daily
    token budget is refused by the other process once its first answer spent it; a key
    without limits is never refused."""
    limited = "sk-rpm-" + secrets.token_urlsafe(16)
    budget = "sk-day-" + secrets.token_urlsafe(16)
    free = "sk-free-" + secrets.token_urlsafe(16)
    keys = tmp_path / "keys.txt"
    write_keys(keys, f"{limited} rpm=3\n{budget} tokens_per_day=5\n{free}\n")
    url = "/v1/chat/completions"
    with (
        serve("gunicorn-gthread", keys, redis=redis_url) as one,
        serve("quart-uvicorn", keys, redis=redis_url) as two,
        httpx.Client(timeout=30) as client,
    ):

        def post(server: Server, key: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"}
            return client.post(server.url + url, json=CHAT, headers=headers)

        statuses = [post(s, limited).status_code for s in (one, two, one)]
        assert statuses == [200, 200, 200]
        for server in (two, one):
            refused = post(server, limited)
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert limited not in refused.text

        first = post(one, budget)  # admitted with budget left, then charged past it
        assert first.status_code == 200
        assert first.json()["usage"]["total_tokens"] > 5
        spent = post(two, budget)
        assert spent.status_code == 429, spent.text
        assert int(spent.headers["retry-after"]) > 3600  # the day's window, not a minute's

        assert [post(s, free).status_code for s in (one, two, one, two)] == [200] * 4
        one.terminate()
        two.terminate()
        logs = one.log() + two.log()
    for key in (limited, budget, free):
        assert key not in logs


@pytest.mark.parametrize("name", list(SERVERS))
def test_a_key_never_appears_in_anything_a_request_produced(name: str, tmp_path: Path) -> None:
    """Every response (bodies and headers: good, refused, bad input, streamed, rate
    limited), the metrics page and the server's whole output at DEBUG hold no key."""
    keys = tmp_path / "keys.txt"
    write_keys(keys, f"{KEY} rpm=4\n")
    seen: list[str] = []

    def record(response: httpx.Response) -> None:
        seen.append(response.text)
        seen.extend(f"{k}: {v}" for k, v in response.headers.items())

    with serve(name, keys) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        good = {"Authorization": f"Bearer {KEY}"}
        for headers in (good, {"Authorization": f"Bearer {NEAR}"}, {"Authorization": KEY}):
            record(client.post("/v1/chat/completions", json=CHAT, headers=headers))
        record(client.post("/v1/chat/completions", content=b"{not json", headers=good))
        record(client.post("/v1/completions", json={"model": "sim", "prompt": "hi"}, headers=good))
        with client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=good
        ) as stream:
            stream.read()
            record(stream)
        limited = client.post("/v1/chat/completions", json=CHAT, headers=good)
        assert limited.status_code == 429  # the fifth request of an rpm=4 key
        record(limited)
        metrics = client.get("/metrics")
        assert "llmbridge_requests_submitted_total" in metrics.text
        record(metrics)
        server.terminate()
        log = server.log()
    everything = "\n".join([*seen, log])
    for key in (KEY, NEAR):
        assert key not in everything
    assert key_id(KEY) in log  # the log names the key by its id only
