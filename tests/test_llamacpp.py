"""``llama_cpp.Llama`` through ``locked()`` and through the engine, with a faithful fake.

tests/test_llamacpp_real.py runs the same paths on a real llama.cpp (a tiny GGUF the
tests write); this fake stays for what a real model can't show on demand: it mirrors
the API llmbridge touches (``create_completion(prompt, max_tokens=, stop=, stream=)``
returning an OpenAI-style dict or a generator of ``text_completion`` chunks, and
``create_chat_completion(messages=, stream=)`` with ``chat.completion.chunk`` deltas)
and, like the real object, holds one context that a stream owns until it ends; unlike
it, it detects a second thread entering and counts it, so a missing lock is a clean
failure rather than a crash inside llama.cpp.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from llmbridge import ConcurrentEntryError, Engine, locked
from llmbridge.backends import LlamaCppBackend

WORDS = [" alpha", " beta", " gamma", " delta", " omega", " zeta"]


def words_for(prompt: str, n: int) -> list[str]:
    """The fake's deterministic tokens for ``prompt``."""
    seed = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
    out = []
    for _ in range(n):
        seed = (seed * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append(WORDS[(seed >> 33) % len(WORDS)])
    return out


def expected(prompt: str, n: int, stop: list[str] | None = None) -> str:
    text = "".join(words_for(prompt, n))
    for s in stop or []:
        if s in text:
            text = text[: text.index(s)]
    return text


class FakeLlama:
    """A ``llama_cpp.Llama`` stand-in: one context, owned by one call or stream at a time."""

    def __init__(self, token_time: float = 0.0005) -> None:
        self.token_time = token_time
        self._context = threading.Lock()
        self.concurrent_entries = 0
        self.closed_streams = 0
        self.threads: set[int] = set()

    def _enter(self) -> None:
        self.threads.add(threading.get_ident())
        if not self._context.acquire(blocking=False):
            self.concurrent_entries += 1
            raise ConcurrentEntryError("llama_decode entered by a second thread")

    def _tokens(
        self, prompt: str, max_tokens: int, stop: list[str] | None
    ) -> Iterator[tuple[str, str | None]]:
        text = ""
        pieces = words_for(prompt, max_tokens)
        for i, piece in enumerate(pieces):
            time.sleep(self.token_time)  # a real decode step releases the GIL too
            for s in stop or []:
                if s in text + piece:
                    cut = (text + piece).index(s)
                    yield (text + piece)[len(text) : cut], "stop"
                    return
            text += piece
            yield piece, "length" if i == len(pieces) - 1 else None

    def create_completion(
        self,
        prompt: str,
        max_tokens: int = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        stop: list[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> Any:
        self._enter()
        if stream:
            return self._stream(prompt, max_tokens, stop, chat=False)
        try:
            parts = list(self._tokens(prompt, max_tokens, stop))
        finally:
            self._context.release()
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "choices": [
                {"index": 0, "text": "".join(p for p, _ in parts), "finish_reason": parts[-1][1]}
            ],
            "usage": {"completion_tokens": len(parts)},
        }

    def create_chat_completion(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int = 16,
        stream: bool = False,
        **kwargs: Any,
    ) -> Any:
        prompt = "\n".join(m["content"] for m in messages)
        self._enter()
        if stream:
            return self._stream(prompt, max_tokens, kwargs.get("stop"), chat=True)
        try:
            text = "".join(p for p, _ in self._tokens(prompt, max_tokens, kwargs.get("stop")))
        finally:
            self._context.release()
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

    def _stream(
        self, prompt: str, max_tokens: int, stop: list[str] | None, chat: bool
    ) -> Iterator[dict[str, Any]]:
        # Entered already: the context belongs to this generator until it ends or closes.
        try:
            if chat:
                yield {
                    "object": "chat.completion.chunk",
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                    ],
                }
            for piece, finish in self._tokens(prompt, max_tokens, stop):
                if chat:
                    yield {
                        "object": "chat.completion.chunk",
                        "choices": [
                            {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                        ],
                    }
                    if finish:
                        yield {
                            "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                        }
                else:
                    yield {
                        "object": "text_completion",
                        "choices": [{"index": 0, "text": piece, "finish_reason": finish}],
                    }
        except GeneratorExit:
            self.closed_streams += 1
            raise
        finally:
            self._context.release()


def _hammer(call: Any, n: int) -> dict[int, Any]:
    results: dict[int, Any] = {}
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait(10)
        try:
            results[i] = call(i)
        except ConcurrentEntryError as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.mark.timeout(30)
def test_the_fake_detects_unserialised_threads() -> None:
    """Without protection, threads streaming from one Llama collide (the bug llmbridge fixes)."""
    llm = FakeLlama()
    _hammer(
        lambda i: "".join(
            c["choices"][0]["text"]
            for c in llm.create_completion(f"p{i}", max_tokens=20, stream=True)
        ),
        8,
    )
    assert llm.concurrent_entries > 0


@pytest.mark.timeout(30)
def test_locked_serialises_calls_and_streams() -> None:
    """Through locked(): streams, whole calls and chats from 12 threads, none collide, all exact."""
    llm = FakeLlama()
    safe = locked(llm)

    def call(i: int) -> str:
        if i % 3 == 0:
            chunks = safe.create_completion(f"p{i}", max_tokens=10, stream=True)
            return "".join(c["choices"][0]["text"] for c in chunks)
        if i % 3 == 1:
            return str(safe.create_completion(f"p{i}", max_tokens=10)["choices"][0]["text"])
        answer = safe.create_chat_completion(
            messages=[{"role": "user", "content": f"p{i}"}], max_tokens=10
        )
        return str(answer["choices"][0]["message"]["content"])

    results = _hammer(call, 12)
    assert results == {i: expected(f"p{i}", 10) for i in range(12)}
    assert llm.concurrent_entries == 0


@pytest.mark.timeout(30)
def test_locked_stream_abandoned_early_frees_the_model() -> None:
    """Closing a locked stream early releases the lock: the next call proceeds."""
    llm = FakeLlama()
    safe = locked(llm)
    chunks = safe.create_completion("first", max_tokens=50, stream=True)
    next(chunks)
    chunks.close()
    assert llm.closed_streams == 1
    assert safe.create_completion("second", max_tokens=3)["choices"][0]["text"] == expected(
        "second", 3
    )


@pytest.mark.timeout(60)
def test_engine_streams_each_request_exactly() -> None:
    """Through the engine: 24 threads and 24 coroutines, one request in the Llama at a time."""
    llm = FakeLlama()
    results: dict[str, str] = {}
    with Engine(LlamaCppBackend(llm)) as engine:

        def threaded(i: int) -> None:
            results[f"t{i}"] = "".join(engine.submit(f"t{i}", max_new_tokens=8))

        async def coroutines() -> None:
            async def one(i: int) -> None:
                results[f"a{i}"] = "".join(
                    [c async for c in engine.submit(f"a{i}", max_new_tokens=8)]
                )

            await asyncio.gather(*(one(i) for i in range(24)))

        threads = [threading.Thread(target=threaded, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        asyncio.run(coroutines())
        for t in threads:
            t.join(30)
    assert results == {k: expected(k, 8) for k in results}
    assert len(results) == 48
    assert llm.concurrent_entries == 0


@pytest.mark.timeout(30)
def test_engine_finish_reasons_chat_and_stop() -> None:
    """Finish reasons, token counts, stop strings and chat messages reach the Completion."""
    llm = FakeLlama()
    with Engine(LlamaCppBackend(llm)) as engine:
        done = engine.submit("reasons", max_new_tokens=6).result(20)
        stop = words_for("reasons", 12)[4]
        stopped = engine.submit("reasons", max_new_tokens=12, stop=[stop]).result(20)
        chat = engine.submit(
            "x", messages=[{"role": "user", "content": "chat me"}], max_new_tokens=5
        ).result(20)
    assert done.finish_reason == "length"
    assert done.completion_tokens == 6
    assert stopped.finish_reason == "stop"
    assert stopped.text == expected("reasons", 12, [stop])
    assert chat.text == expected("chat me", 5)


@pytest.mark.timeout(30)
def test_engine_cancel_closes_the_llama_stream() -> None:
    """A consumer that leaves closes the llama_cpp generator; the next request runs."""
    llm = FakeLlama(token_time=0.002)
    with Engine(LlamaCppBackend(llm)) as engine:
        doomed = engine.submit("long", max_new_tokens=5000)
        next(iter(doomed))
        doomed.cancel()
        assert engine.submit("after", max_new_tokens=4).result(20).text == expected("after", 4)
    assert llm.closed_streams == 1
    assert llm.concurrent_entries == 0


class TokenizingFakeLlama(FakeLlama):
    """The fake with a ``tokenize`` (one token a word, plus a BOS when asked)."""

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        assert special  # parsed as create_completion parses a prompt
        return [1] * add_bos + [7] * len(text.split())


@pytest.mark.timeout(30)
def test_prompt_tokens_come_from_tokenize_and_are_absent_without_it() -> None:
    """A completion's prompt tokens are ``tokenize(prompt, add_bos=True, special=True)``'s
    count; an object without ``tokenize``, or a chat method that is not
    ``llama_cpp.Llama``'s (it never hands a prompt to ``create_completion``), reports
    none (0), and the text is unaffected."""
    messages = [{"role": "user", "content": "chat me"}]
    with Engine(LlamaCppBackend(TokenizingFakeLlama())) as engine:
        counted = engine.submit("three small words", max_new_tokens=2).result(20)
        chat = engine.chat(messages, max_new_tokens=2).result(20)
    with Engine(LlamaCppBackend(FakeLlama())) as engine:
        uncounted = engine.submit("three small words", max_new_tokens=2).result(20)
    assert counted.prompt_tokens == 4
    assert (chat.prompt_tokens, chat.text) == (0, expected("chat me", 2))
    assert (uncounted.prompt_tokens, uncounted.text) == (0, expected("three small words", 2))
