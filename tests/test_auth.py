"""API keys and principals: the pure parts, ApiKeys' sources, and the blueprints in-process.

What needs a real server (gunicorn, uvicorn, Quart, two processes over Redis, the SDK and
LangChain) is in ``test_auth_servers.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from llmbridge import Engine, RateLimited
from llmbridge._policies.budget import Quotas
from llmbridge._sansio import keys as keys_module
from llmbridge._sansio.keys import KeyTable, bearer_token, key_id, parse_keys
from llmbridge.openai import ApiKeys, KeyLimits, Principal, flask_blueprint, quart_blueprint
from llmbridge.policies import Pipeline, RateLimit
from llmbridge.testing import simulated_engine

pytestmark = pytest.mark.timeout(60)

KEY = "sk-" + secrets.token_urlsafe(24)
OTHER = "sk-" + secrets.token_urlsafe(24)
CHAT = {"model": "llmbridge", "messages": [{"role": "user", "content": "hi"}]}


def echo(prompt: str, **params: Any) -> str:
    return "echo"


def flask_app(submitter: Any, **options: Any) -> Flask:
    app = Flask("auth_test")
    app.register_blueprint(flask_blueprint(submitter, **options))
    seen: list[object] = []
    app.config["seen"] = seen

    @app.after_request
    def note(response: Any) -> Any:  # what a per-request log line would read
        from flask import g, request

        seen.append((request.environ.get("llmbridge.principal"), g.get("llmbridge_principal")))
        return response

    return app


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- the pure parts -------------------------------------------------------------------------


def test_bearer_token_parsing() -> None:
    """Only ``Bearer <token>`` (any case) yields a token."""
    assert bearer_token(f"Bearer {KEY}") == KEY
    assert bearer_token(f"bearer  {KEY} ") == KEY
    for header in (None, "", "Bearer", "Bearer ", f"Basic {KEY}", KEY, f"Bearer {KEY} extra"):
        assert bearer_token(header) is None, header


def test_key_id_is_short_stable_and_not_the_key() -> None:
    """A key id is ``key-`` and 16 hex digits, the same every time, and holds no key."""
    assert key_id(KEY) == key_id(KEY)
    assert key_id(KEY) != key_id(OTHER)
    assert key_id(KEY).startswith("key-")
    assert len(key_id(KEY)) == 20
    assert KEY not in key_id(KEY)


def test_parse_keys_lines_comments_options_and_errors() -> None:
    """One key a line or comma-separated, comments and blanks skipped, options after the
    key; a bad option names the line, never its text."""
    text = f"# keys\n\n{KEY} name=ci rpm=5   # the CI key\n{OTHER},sk-third\n"
    entries = parse_keys(text)
    assert [e.key for e in entries] == [KEY, OTHER, "sk-third"]
    assert entries[0].options == {"name": "ci", "rpm": "5"}
    assert KEY not in repr(entries)
    with pytest.raises(ValueError, match="line 2") as bad:
        parse_keys(f"{OTHER}\n{KEY} colour=blue\n", source="keys.txt")
    assert KEY not in str(bad.value)
    assert "keys.txt" in str(bad.value)


def test_lookup_compares_every_key_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup runs ``compare_digest`` over one fixed-length digest per configured key,
    for a match, a near miss and a key of another length alike (no early exit)."""
    table = KeyTable([(KEY, "a"), (OTHER, "b"), ("sk-short", "c")])
    calls: list[tuple[int, int]] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    for presented, expected in ((KEY, "a"), (KEY[:-1] + "?", None), ("x", None), ("sk-short", "c")):
        calls.clear()
        assert table.lookup(presented) == expected
        assert calls == [(32, 32)] * 3
    assert KEY not in repr(table)


# -- ApiKeys' sources -----------------------------------------------------------------------


def test_api_keys_from_code_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys in code, in an environment variable and in a file give principals named by key
    id, with each line's limits over the defaults; none shows in a repr."""
    coded = ApiKeys({KEY: KeyLimits(requests_per_minute=2), OTHER: None})
    principal = coded.lookup(KEY)
    assert principal == Principal(key_id(KEY), None, KeyLimits(requests_per_minute=2))
    assert coded.lookup(OTHER) == Principal(key_id(OTHER), None, KeyLimits())
    assert coded.lookup("sk-nope") is None

    monkeypatch.setenv("TEST_KEYS", f"{KEY} name=ci tpm=100, {OTHER}")
    from_env = ApiKeys.from_env("TEST_KEYS", limits=KeyLimits(requests_per_minute=9))
    found = from_env.lookup(KEY)
    assert found is not None
    assert found.name == "ci"
    assert found.limits == KeyLimits(requests_per_minute=9, tokens_per_minute=100)

    path = tmp_path / "keys"
    path.write_text(f"{KEY} tokens_per_day=1000 rpm=none\n")
    from_file = ApiKeys.from_file(path, limits=KeyLimits(requests_per_minute=9))
    found = from_file.lookup(KEY)
    assert found is not None
    assert found.limits == KeyLimits(tokens_per_day=1000)
    for keys in (coded, from_env, from_file):
        assert KEY not in repr(keys)


def test_empty_or_missing_key_sources_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """No keys from code or an unset/empty variable is an error, not an open door."""
    monkeypatch.delenv("TEST_NO_KEYS", raising=False)
    with pytest.raises(ValueError, match="TEST_NO_KEYS"):
        ApiKeys.from_env("TEST_NO_KEYS")
    monkeypatch.setenv("TEST_NO_KEYS", " # nothing\n")
    with pytest.raises(ValueError, match="TEST_NO_KEYS"):
        ApiKeys.from_env("TEST_NO_KEYS")
    with pytest.raises(ValueError, match="at least one key"):
        ApiKeys([])
    with pytest.raises(ValueError, match="without whitespace"):
        ApiKeys(["sk a"])
    with pytest.raises(ValueError, match="rpm must be") as bad:
        ApiKeys(f"{KEY} rpm=lots")
    assert KEY not in str(bad.value)


def test_key_file_is_reread_when_it_changes(tmp_path: Path, caplog: Any) -> None:
    """A revoked key stops working on the next lookup; a broken rewrite keeps the last
    good keys and logs a warning that names no key."""
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n{OTHER}\n")
    keys = ApiKeys.from_file(path, reload_interval=0)
    assert keys.lookup(KEY) is not None
    assert len(keys) == 2
    tmp = tmp_path / "keys.new"
    tmp.write_text(f"{OTHER}\n")
    os.replace(tmp, path)
    assert keys.lookup(KEY) is None
    assert keys.lookup(OTHER) is not None
    tmp.write_text(f"{OTHER} bogus\n{KEY}\n")
    os.replace(tmp, path)
    with caplog.at_level(logging.WARNING, logger="llmbridge.openai"):
        assert keys.lookup(OTHER) is not None  # the last good file still holds
        assert keys.lookup(KEY) is None
    assert "not reloaded" in caplog.text
    assert KEY not in caplog.text
    assert OTHER not in caplog.text
    path.write_text("")
    assert keys.lookup(OTHER) is None  # an empty file admits nobody


# -- the blueprints -------------------------------------------------------------------------


def test_auth_must_be_chosen_explicitly() -> None:
    """Without ``auth=`` a blueprint is refused; ``auth=None`` serves openly."""
    engine = Engine(echo)
    with pytest.raises(TypeError, match="auth="):
        flask_blueprint(engine)
    with pytest.raises(TypeError, match="auth="):
        quart_blueprint(engine)
    with pytest.raises(TypeError, match="auth must be") as wrong:
        flask_blueprint(engine, auth=KEY)  # a key where ApiKeys([...]) belongs
    assert KEY not in str(wrong.value)
    client = flask_app(engine, auth=None).test_client()
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    engine.close()


def test_open_routes_warn_on_a_non_loopback_address(caplog: Any) -> None:
    """``auth=None`` logs one warning once a non-loopback address serves; none on loopback."""
    engine = Engine(echo)
    client = flask_app(engine, auth=None).test_client()
    with caplog.at_level(logging.WARNING, logger="llmbridge.openai"):
        client.get("/v1/models", base_url="http://127.0.0.1/")
        assert "without API keys" not in caplog.text
        client.get("/v1/models", base_url="http://10.20.30.40/")
        client.get("/v1/models", base_url="http://10.20.30.40/")
    assert caplog.text.count("without API keys") == 1
    engine.close()


def test_flask_refusals_principal_and_open_models() -> None:
    """401 with the challenge for every route without a valid key; the principal's id is
    in the environ and ``g``; ``open_models=True`` opens only the model list."""
    engine = Engine(echo)
    app = flask_app(engine, auth=ApiKeys([KEY]))
    client = app.test_client()
    for response in (
        client.post("/v1/chat/completions", json=CHAT),
        client.post("/v1/chat/completions", json=CHAT, headers=bearer(OTHER)),
        client.get("/v1/models"),
        client.get("/v1/models/llmbridge"),
        client.get("/v1/anything"),
    ):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.get_json()["error"]["code"] == "invalid_api_key"
    ok = client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY))
    assert ok.status_code == 200
    environ_id, principal = app.config["seen"][-1]
    assert environ_id == key_id(KEY)
    assert isinstance(principal, Principal)
    assert principal.id == key_id(KEY)

    opened = flask_app(engine, auth=ApiKeys([KEY]), open_models=True).test_client()
    assert opened.get("/v1/models").status_code == 200
    assert opened.get("/v1/models/llmbridge").status_code == 200
    assert opened.post("/v1/chat/completions", json=CHAT).status_code == 401
    engine.close()


def test_flask_hook_answers() -> None:
    """A hook's Principal or str is the caller, ``None`` a 401, a raising hook a JSON 500
    that says nothing, an async hook under Flask a JSON 500."""
    engine = Engine(echo)

    def hook(request: Any) -> Any:
        user = request.headers.get("X-User")
        if user == "boom":
            raise RuntimeError(f"hook broke on {KEY}")
        return {"alice": Principal("u-alice"), "bob": "u-bob"}.get(user or "")

    async def async_hook(request: Any) -> Principal:
        return Principal("never")

    app = flask_app(engine, auth=hook)
    client = app.test_client()
    assert (
        client.post("/v1/chat/completions", json=CHAT, headers={"X-User": "alice"}).status_code
        == 200
    )
    assert app.config["seen"][-1][0] == "u-alice"
    assert (
        client.post("/v1/chat/completions", json=CHAT, headers={"X-User": "bob"}).status_code == 200
    )
    assert app.config["seen"][-1][0] == "u-bob"
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
    broken = client.post("/v1/chat/completions", json=CHAT, headers={"X-User": "boom"})
    assert broken.status_code == 500
    assert KEY not in broken.text
    assert broken.get_json()["error"]["code"] == "internal_error"
    asynced = flask_app(engine, auth=async_hook).test_client()
    assert asynced.get("/v1/models").status_code == 500
    engine.close()


def test_quart_async_hook_and_keys() -> None:
    """Under Quart an async hook is awaited; keys refuse and admit as under Flask."""
    from quart import Quart, g, request

    engine = Engine(echo)

    async def hook(req: Any) -> Principal | None:
        await asyncio.sleep(0)
        return Principal("u-q") if req.headers.get("X-User") == "q" else None

    async def main() -> None:
        for auth, good in ((hook, {"X-User": "q"}), (ApiKeys([KEY]), bearer(KEY))):
            app = Quart("auth_quart")
            app.register_blueprint(quart_blueprint(engine, auth=auth, handle_signals=False))
            seen: list[object] = []

            @app.after_request
            async def note(response: Any, seen: list[Any] = seen) -> Any:
                seen.append(
                    (request.scope.get("llmbridge.principal"), g.get("llmbridge_principal"))
                )
                return response

            client = app.test_client()
            refused = await client.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 401
            assert refused.headers["WWW-Authenticate"] == "Bearer"
            ok = await client.post("/v1/chat/completions", json=CHAT, headers=good)
            assert ok.status_code == 200
            assert isinstance(seen[-1][1], Principal)
            assert seen[-1][0] == seen[-1][1].id

    asyncio.run(main())
    engine.close()


def test_principal_is_the_pipeline_key_and_cache_namespace() -> None:
    """Over a Pipeline each key has its own rate limit and its own cache namespace."""
    calls: list[str] = []

    def counting(prompt: str, **params: Any) -> str:
        calls.append(prompt)
        return "answer"

    pipeline = Pipeline(
        Engine(counting), rate_limit=RateLimit(requests_per_minute=2), cache="memory"
    )
    client = flask_app(pipeline, auth=ApiKeys([KEY, OTHER])).test_client()
    body = {**CHAT, "temperature": 0}
    url = "/v1/chat/completions"
    assert client.post(url, json=body, headers=bearer(KEY)).status_code == 200
    assert client.post(url, json=body, headers=bearer(OTHER)).status_code == 200
    assert len(calls) == 2  # the other key's identical request is not served from the cache
    assert pipeline.stats.cache_hits == 0
    assert client.post(url, json=body, headers=bearer(KEY)).status_code == 200
    assert pipeline.stats.cache_hits == 1  # the same key's is
    refused = client.post(url, json=body, headers=bearer(KEY))
    assert refused.status_code == 429  # KEY made its 2 requests; OTHER has one left
    assert KEY not in refused.text
    assert client.post(url, json=body, headers=bearer(OTHER)).status_code == 200
    pipeline.close()


def test_per_key_limits_requests_and_daily_tokens() -> None:
    """``rpm=`` refuses the next request with 429 and Retry-After; a daily token budget
    refuses once a whole answer has spent it, with a day-long Retry-After."""
    engine = simulated_engine(max_new_tokens=8)
    client = flask_app(engine, auth=ApiKeys(f"{KEY} rpm=2\n{OTHER} tokens_per_day=3")).test_client()
    url = "/v1/chat/completions"
    assert [client.post(url, json=CHAT, headers=bearer(KEY)).status_code for _ in "ab"] == [200] * 2
    refused = client.post(url, json=CHAT, headers=bearer(KEY))
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.get_json()["error"]["type"] == "rate_limit_error"
    first = client.post(url, json=CHAT, headers=bearer(OTHER))
    assert first.status_code == 200
    assert first.get_json()["usage"]["total_tokens"] > 3
    spent = client.post(url, json=CHAT, headers=bearer(OTHER))
    assert spent.status_code == 429
    assert int(spent.headers["Retry-After"]) > 3600
    engine.close()


def test_streamed_answers_are_charged_when_they_end() -> None:
    """A streamed answer's tokens reach the key's budget as the stream ends."""
    engine = simulated_engine(max_new_tokens=8)
    keys = ApiKeys(f"{KEY} tokens_per_day=3")
    client = flask_app(engine, auth=keys).test_client()
    url = "/v1/chat/completions"
    streamed = client.post(url, json={**CHAT, "stream": True}, headers=bearer(KEY))
    assert streamed.status_code == 200
    assert streamed.get_data().rstrip().endswith(b"[DONE]")
    limits = KeyLimits(tokens_per_day=3)
    quotas = keys.quotas

    async def spent() -> bool:
        try:
            await quotas.acquire(key_id(KEY), limits)
        except RateLimited:
            return True
        return False

    from llmbridge._runtime.loop import spawn

    # The charge was posted to the background loop before the last chunk; it lands
    # after a few of the loop's turns: probe until it has (bounded, no sleeps).
    assert any(spawn(spent()).result(10) for _ in range(1000))
    engine.close()


def test_rate_limit_tokens_per_day() -> None:
    """RateLimit's daily token budget: admitted until charged past it, then refused
    until the day's window ends."""
    limit = RateLimit(tokens_per_day=100)
    assert "tokens_per_day=100" in repr(limit)

    async def main() -> float:
        await limit.acquire("k")
        await limit.charge("k", 60)
        await limit.acquire("k")
        await limit.charge("k", 60)
        with pytest.raises(RateLimited) as spent:
            await limit.acquire("k")
        await limit.acquire("other")
        assert spent.value.retry_after is not None
        return spent.value.retry_after

    assert asyncio.run(main()) > 3600
    with pytest.raises(ValueError, match="tokens_per_day"):
        RateLimit(tokens_per_day=0)


def test_key_limits_validation() -> None:
    """KeyLimits take positive ints; Quotas a memory or Redis URL."""
    with pytest.raises(ValueError, match="requests_per_minute"):
        KeyLimits(requests_per_minute=0)
    with pytest.raises(ValueError, match="storage"):
        Quotas(storage="sqlite://")
    assert not KeyLimits().any
    assert KeyLimits(tokens_per_day=1).any


def test_lookup_is_thread_safe_across_reloads(tmp_path: Path) -> None:
    """Lookups from many threads while the file changes see either keys list, whole."""
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n{OTHER}\n")
    keys = ApiKeys.from_file(path, reload_interval=0)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                assert keys.lookup(OTHER) is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for i in range(50):
        tmp = tmp_path / "keys.new"
        tmp.write_text(f"{OTHER}\n" if i % 2 else f"{KEY}\n{OTHER}\n")
        os.replace(tmp, path)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert errors == []


def test_quart_streamed_answers_count_where_the_next_request_looks() -> None:
    """Under Quart (memory:// counts) a streamed answer's tokens, charged as its body
    ends, refuse the key's next request once they have landed."""
    from quart import Quart

    from llmbridge._runtime.loop import spawn

    engine = simulated_engine(max_new_tokens=8)
    keys = ApiKeys(f"{KEY} tokens_per_day=3")
    app = Quart("auth_quart_budget")
    app.register_blueprint(quart_blueprint(engine, auth=keys, handle_signals=False))
    url = "/v1/chat/completions"
    limits = KeyLimits(tokens_per_day=3)

    async def spent() -> bool:
        try:
            await keys.quotas.acquire(key_id(KEY), limits)
        except RateLimited:
            return True
        return False

    async def main() -> None:
        client = app.test_client()
        streamed = await client.post(url, json={**CHAT, "stream": True}, headers=bearer(KEY))
        assert streamed.status_code == 200
        assert (await streamed.get_data()).rstrip().endswith(b"[DONE]")
        for _ in range(1000):  # until the charge has landed (bounded, no sleeps)
            if await asyncio.wrap_future(spawn(spent())):
                break
        refused = await client.post(url, json=CHAT, headers=bearer(KEY))
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) > 3600

    asyncio.run(main())
    engine.close()
