"""``LlamaCppBackend`` and ``locked()`` over a real ``llama_cpp.Llama``, on the CPU.

The model is tests/tiny_gguf.py's: random weights, written here, no download. Greedy
text is compared exactly with ``llama_cpp.Llama`` called directly on the same file with
the same settings; through Flask the servers are real (werkzeug's threaded server and
gunicorn's gthread workers), and a client that leaves must stop the generation.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

if os.environ.get("CI"):
    # CI builds llama-cpp-python from its sdist (.ci/llamacpp.sh): there these must run.
    import gguf  # noqa: F401
    import llama_cpp
else:
    pytest.importorskip("gguf", reason="pip install gguf")
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python")

import tiny_gguf
from tiny_gguf import GREEDY, load

from llmbridge import Engine, locked
from llmbridge._sansio.sse import SSEDecoder
from llmbridge.backends import LlamaCppBackend

from support import PYTHON, free_port, run_server

PROMPTS = [f"request {i}: tell me about {w}" for i, w in enumerate("abcdefghijkl")]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf.write(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0)


@pytest.fixture(scope="module")
def direct(model: Path) -> Any:
    """A ``Llama`` of its own, called directly: the reference."""
    return load(str(model))


def reference(llm: Any, prompt: str, n: int, **params: Any) -> dict[str, Any]:
    """``llm.create_completion`` called directly, greedy unless ``params`` say otherwise."""
    return llm.create_completion(prompt, max_tokens=n, **{**GREEDY, **params})["choices"][0]


@pytest.mark.timeout(60)
def test_tiny_model_generates_plain_text(direct: Any, model: Path) -> None:
    """The writer's model loads, is small, and its greedy text is ASCII of full length."""
    assert model.stat().st_size < 600_000
    choice = reference(direct, "hello", 40)
    assert choice["finish_reason"] == "length"
    assert len(choice["text"]) == 40  # one printable byte a token
    assert choice["text"].isascii()
    assert choice["text"].isprintable()


@pytest.mark.timeout(120)
def test_engine_greedy_equals_llama_directly(direct: Any, model: Path) -> None:
    """Through the engine (threads and coroutines at once) each request's greedy text is
    exactly ``Llama.create_completion``'s; a chat exactly ``create_chat_completion``'s."""
    want = {p: reference(direct, p, 24)["text"] for p in PROMPTS}
    messages = [{"role": "user", "content": "chat with me"}]
    chat_want = direct.create_chat_completion(messages=messages, max_tokens=16, **GREEDY)
    results: dict[str, str] = {}
    with Engine(LlamaCppBackend(load(str(model)))) as engine:

        def threaded(p: str) -> None:
            results[p] = "".join(engine.submit(p, max_new_tokens=24, **GREEDY))

        async def coroutines() -> None:
            async def one(p: str) -> None:
                results[p] = "".join(
                    [c async for c in engine.submit(p, max_new_tokens=24, **GREEDY)]
                )

            await asyncio.gather(*(one(p) for p in PROMPTS[6:]))

        threads = [threading.Thread(target=threaded, args=(p,)) for p in PROMPTS[:6]]
        for t in threads:
            t.start()
        asyncio.run(coroutines())
        for t in threads:
            t.join(60)
        done = engine.submit(PROMPTS[0], max_new_tokens=24, **GREEDY).result(60)
        chat = engine.submit("", messages=messages, max_new_tokens=16, **GREEDY).result(60)
    assert results == want
    assert done.finish_reason == "length"
    assert done.completion_tokens == 24
    assert chat.text == chat_want["choices"][0]["message"]["content"]


#: Prompts whose token counts differ: empty (the BOS alone), plain, multi-byte text.
COUNTED = ["", "hello", PROMPTS[3], " two  spaces ", "ünïcödé ✓ 漢字"]
CHATS = [
    [{"role": "user", "content": "chat with me"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "ünïcödé, again"},
    ],
]


def _own_counts(direct: Any) -> tuple[list[int], list[int]]:
    """llama.cpp's own prompt_tokens: the usage of non-streamed calls."""
    plain = [
        direct.create_completion(p, max_tokens=2, **GREEDY)["usage"]["prompt_tokens"]
        for p in COUNTED
    ]
    chats = [
        direct.create_chat_completion(messages=m, max_tokens=2, **GREEDY)["usage"]["prompt_tokens"]
        for m in CHATS
    ]
    return plain, chats


@pytest.mark.parametrize("path", ["engine", "locked"])
@pytest.mark.timeout(120)
def test_prompt_tokens_equal_llamas_own_count(direct: Any, model: Path, path: str) -> None:
    """llama.cpp streams no usage; the engine's Completion still has the prompt's tokens,
    equal to the usage llama.cpp reports for the same prompt (non-streamed), for
    completions and for chats (whose prompt the chat handler formats). ``engine``:
    ``LlamaCppBackend(llm)``; ``locked``: ``LlamaCppBackend(locked(llm))``, a Llama that
    threads also call directly meanwhile (each waits for the other's generation)."""
    plain, chats = _own_counts(direct)
    assert len(set(plain)) == len(plain)  # the prompts really differ in length
    llm = load(str(model))
    shared = locked(llm) if path == "locked" else llm
    with Engine(LlamaCppBackend(shared)) as engine:
        direct_calls: list[str] = []
        if path == "locked":
            # Threads calling the shared Llama through the lock while the engine runs.
            def beside(i: int) -> None:
                chunks = shared.create_completion(PROMPTS[i], max_tokens=8, stream=True, **GREEDY)
                direct_calls.append("".join(c["choices"][0]["text"] for c in chunks))

            threads = [threading.Thread(target=beside, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
        got = [engine.submit(p, max_new_tokens=3, **GREEDY).result(60) for p in COUNTED]
        got_chats = [engine.chat(m, max_new_tokens=3, **GREEDY).result(60) for m in CHATS]
        if path == "locked":
            for t in threads:
                t.join(60)
            assert sorted(direct_calls) == sorted(reference(direct, PROMPTS[i], 8)["text"]
                                                  for i in range(3))  # fmt: skip
    assert [c.prompt_tokens for c in got] == plain
    assert [c.prompt_tokens for c in got_chats] == chats
    assert [c.text for c in got] == [reference(direct, p, 3)["text"] for p in COUNTED]
    assert llm.create_completion.__func__ is type(llm).create_completion  # nothing patched


@pytest.mark.timeout(60)
def test_engine_sampling_with_a_seed_equals_llama_directly(direct: Any, model: Path) -> None:
    """Sampled (temperature 0.9, a seed) through the engine: the same text as directly."""
    sampled = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 77}
    want = reference(direct, "sample me", 32, **sampled)["text"]
    with Engine(LlamaCppBackend(load(str(model)))) as engine:
        got = engine.submit("sample me", max_new_tokens=32, **sampled).result(60)
    assert got.text == want
    assert want != reference(direct, "sample me", 32)["text"]  # it did sample


@pytest.mark.timeout(60)
def test_engine_stop_strings(direct: Any, model: Path) -> None:
    """A stop string cuts the text where llama_cpp cuts it, with finish reason "stop"."""
    full = reference(direct, PROMPTS[1], 40)["text"]
    stop = full[12:15]
    want = reference(direct, PROMPTS[1], 40, stop=[stop])
    assert want["finish_reason"] == "stop"
    with Engine(LlamaCppBackend(load(str(model)))) as engine:
        got = engine.submit(PROMPTS[1], max_new_tokens=40, stop=[stop], **GREEDY).result(60)
    assert got.text == want["text"] == full[: full.index(stop)]
    assert got.finish_reason == "stop"


@pytest.mark.timeout(120)
def test_locked_threads_share_one_llama(direct: Any, model: Path) -> None:
    """``locked(llm)`` from 9 threads: streams, whole completions, chats, all exact."""
    safe = locked(load(str(model)))
    messages = [{"role": "user", "content": "locked chat"}]
    chat_want = direct.create_chat_completion(messages=messages, max_tokens=12, **GREEDY)
    barrier = threading.Barrier(9)
    results: dict[int, str] = {}

    def call(i: int) -> None:
        barrier.wait(30)
        if i % 3 == 0:
            chunks = safe.create_completion(PROMPTS[i], max_tokens=20, stream=True, **GREEDY)
            results[i] = "".join(c["choices"][0]["text"] for c in chunks)
        elif i % 3 == 1:
            answer = safe.create_completion(PROMPTS[i], max_tokens=20, **GREEDY)
            results[i] = answer["choices"][0]["text"]
        else:
            answer = safe.create_chat_completion(messages=messages, max_tokens=12, **GREEDY)
            results[i] = answer["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    chat_text = chat_want["choices"][0]["message"]["content"]
    assert results == {
        i: chat_text if i % 3 == 2 else reference(direct, PROMPTS[i], 20)["text"] for i in range(9)
    }


# -- real Flask servers -------------------------------------------------------------------

SERVERS = {
    "werkzeug": [PYTHON, "-m", "flask", "--app", "llamacpp_app:app", "run", "--port", "{port}"],
    "gunicorn-gthread": [
        PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "24", "-w", "1",
        "-b", "127.0.0.1:{port}", "llamacpp_app:app",
    ],
}  # fmt: skip


def _server(kind: str, model: Path, delay: float = 0.0) -> Any:
    env = {"LLAMACPP_MODEL": str(model), "LLAMACPP_TOKEN_DELAY": str(delay)}
    return run_server(SERVERS[kind], port=free_port(), env=env, cwd=Path(__file__).parent)


async def read_sse(client: httpx.AsyncClient, prompt: str, n: int) -> tuple[str, dict[str, Any]]:
    decoder = SSEDecoder()
    text: list[str] = []
    done: dict[str, Any] = {}
    async with client.stream("GET", "/sse", params={"p": prompt, "n": n}) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for chunk in reply.aiter_bytes():
            for event in decoder.feed(chunk):
                if event.event == "done":
                    done = json.loads(event.data)
                elif event.event == "message":
                    text.append(json.loads(event.data)["text"])
    return "".join(text), done


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", list(SERVERS))
def test_flask_concurrent_streams_exact_and_isolated(kind: str, direct: Any, model: Path) -> None:
    """12 concurrent clients on the engine route and 8 on the locked() route of one real
    server: every stream is exactly its own prompt's greedy text."""
    want = {p: reference(direct, p, 32)["text"] for p in PROMPTS}

    async def main(url: str) -> None:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

            async def via_locked(p: str) -> str:
                reply = await client.get("/locked", params={"p": p, "n": 32})
                assert reply.status_code == 200
                return reply.text

            engine_results = asyncio.gather(*(read_sse(client, p, 32) for p in PROMPTS))
            locked_results = asyncio.gather(*(via_locked(p) for p in PROMPTS[:8]))
            streamed, whole = await asyncio.gather(engine_results, locked_results)
        for p, (text, done) in zip(PROMPTS, streamed, strict=True):
            assert text == want[p], p
            assert done["finish_reason"] == "length"
            assert done["usage"]["completion_tokens"] == 32
        assert whole == [want[p] for p in PROMPTS[:8]]

    with _server(kind, model) as server:
        asyncio.run(main(server.url))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(SERVERS))
def test_flask_client_that_leaves_stops_generation(kind: str, direct: Any, model: Path) -> None:
    """A client that reads a few chunks of a 2,000-token stream and disconnects: the
    generation stops (tokens counted in the server's Llama), and the next request runs."""
    n = 2000

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async with client.stream("GET", "/sse", params={"p": "leave", "n": n}) as reply:
                assert reply.status_code == 200
                seen = 0
                async for chunk in reply.aiter_bytes():
                    seen += chunk.count(b"data:")
                    if seen >= 3:
                        break
            deadline = time.monotonic() + 30
            while True:
                stats = (await client.get("/stats")).json()
                if stats["open_streams"] == 0:
                    break
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.05)
            # 5 ms a token: all 2,000 would have taken 10 s; the stream ended far sooner.
            assert 3 <= stats["generated"] < n // 4, stats
            text, done = await read_sse(client, PROMPTS[2], 16)
            assert text == reference(direct, PROMPTS[2], 16)["text"]
            assert done["finish_reason"] == "length"

    with _server(kind, model, delay=0.005) as server:
        asyncio.run(main(server.url))
