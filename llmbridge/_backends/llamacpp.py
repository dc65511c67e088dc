"""``llama_cpp.Llama`` behind an engine.

A ``Llama`` object holds one context and one KV cache: it is not thread-safe, and it
runs one generation at a time. Two ways to share it between Flask request threads:

- ``llmbridge.locked(llm)``: every call takes a lock; a streaming call holds it until its
  generator is exhausted or closed. Simple, for run-to-completion calls.
- :class:`LlamaCppBackend` in an :class:`~llmbridge.Engine`: requests queue in the
  engine, one runs at a time in one worker thread, its chunks stream to its own
  :class:`~llmbridge.Stream`, and a consumer that leaves stops its generation between
  tokens, freeing the model for the next request.

Nothing here imports ``llama_cpp``: pass the ``Llama`` you built.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from .._core.channel import Request
from .._core.drivers import serve_async
from .._core.jobs import Job, JobQueue
from .._core.locked import Locked
from .._exceptions import ConcurrentEntryError

__all__ = ["LlamaCppBackend"]

# Engine parameters llama_cpp's create_completion / create_chat_completion accept.
_PASSED = ("temperature", "top_p", "top_k", "stop", "seed", "repeat_penalty", "grammar")


class LlamaCppBackend:
    """Drives one ``llama_cpp.Llama`` for an engine: one request at a time, streamed.

    A request with ``messages=[...]`` calls ``llm.create_chat_completion(messages=...,
    stream=True)``; one without calls ``llm.create_completion(prompt, stream=True)``.
    ``max_new_tokens`` (or ``max_tokens``, default ``max_tokens``) and ``temperature``,
    ``top_p``, ``top_k``, ``stop``, ``seed``, ``repeat_penalty``, ``grammar`` are passed
    on. The call runs in a worker thread, never on an event loop; the finish reason
    (``"length"`` / ``"stop"``), the number of streamed tokens and the prompt's tokens
    reach the :class:`~llmbridge.Completion`.

    Prompt tokens: llama-cpp-python's streams carry no usage, so they are counted as
    ``create_completion`` counts them (``llm.tokenize(prompt, add_bos=True,
    special=True)``: the same number as a non-streamed call's ``usage``). For a chat,
    the chat handler formats the messages and hands ``create_completion`` the tokens;
    that is what is counted. An object that is not a ``llama_cpp.Llama`` (a fake
    without ``tokenize``, a chat method that never calls ``create_completion``) reports
    none (``prompt_tokens`` 0).

    ``llm`` may be ``locked(llm)``, shared with threads that call it directly: each
    generation then holds its lock from the first token to the last.

    Only one call is ever inside ``llm`` (``max_concurrency`` is 1 by design; the other
    requests wait in the engine's queue). A consumer that cancels closes the
    ``llama_cpp`` generator before its next token.

    >>> backend = LlamaCppBackend(llm)  # doctest: +SKIP
    >>> engine = Engine(backend)  # doctest: +SKIP
    """

    max_concurrency = 1

    def __init__(self, llm: Any, *, max_tokens: int = 256) -> None:
        for method in ("create_completion", "create_chat_completion"):
            if not callable(getattr(llm, method, None)):
                raise TypeError(f"LlamaCppBackend needs a llama_cpp.Llama (no {method}())")
        self.llm = llm
        self.max_tokens = max_tokens
        self._limiter: Any = None
        self._inside = threading.Lock()

    def __repr__(self) -> str:
        return f"LlamaCppBackend({self.llm!r})"

    def serve(self, jobs: JobQueue) -> None:
        """Run requests, one at a time, until the engine closes (engine thread)."""
        serve_async(self, jobs, max_concurrency=self.max_concurrency)

    async def aopen(self) -> None:
        """Create the one-thread limiter on the engine loop."""
        import anyio

        self._limiter = anyio.CapacityLimiter(1)

    async def generate(self, request: Request, job: Job) -> None:
        """Run one request in the worker thread, streaming its chunks to ``job``."""
        import anyio.to_thread

        worker = asyncio.ensure_future(
            anyio.to_thread.run_sync(self._run, request, job, limiter=self._limiter)
        )
        try:
            await asyncio.shield(worker)
        except asyncio.CancelledError:
            # The consumer left. The worker notices at its next token and closes the
            # llama_cpp generator; wait for that, so this task (and its concurrency slot)
            # ends only once the model is free for the next request.
            await asyncio.wait({worker})
            raise

    def _run(self, request: Request, job: Job) -> None:
        if not self._inside.acquire(blocking=False):
            raise ConcurrentEntryError("two requests entered the Llama at once")
        try:
            self._stream(request, job)
        finally:
            self._inside.release()

    def _stream(self, request: Request, job: Job) -> None:
        params = request.params
        kwargs: dict[str, Any] = {
            "max_tokens": params.get("max_new_tokens", params.get("max_tokens", self.max_tokens)),
            "stream": True,
        }
        kwargs.update((k, params[k]) for k in _PASSED if params.get(k) is not None)
        messages = params.get("messages")
        llm = self.llm
        # A shared locked(llm): hold its lock for the whole generation, as its own
        # streams do, and call the Llama itself inside it.
        held = llm.lock if isinstance(llm, Locked) else contextlib.nullcontext()
        with held:
            raw = llm.wrapped if isinstance(llm, Locked) else llm
            counter = _PromptCounter(raw)
            chunks: Iterator[dict[str, Any]]
            if messages is not None:
                chunks = counter._chat(messages, kwargs)
            else:
                counter._count(request.prompt)
                chunks = raw.create_completion(request.prompt, **kwargs)
            finish = "stop"
            tokens = 0
            try:
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    delta = choice.get("delta")
                    text = delta.get("content") if delta is not None else choice.get("text")
                    if text:
                        tokens += 1
                        # A worker thread: wait here while the reader is max_unread behind.
                        if not job.emit_or_wait(text):
                            return  # the consumer left: the finally closes the generation
                    if choice.get("finish_reason"):
                        finish = "length" if choice["finish_reason"] == "length" else "stop"
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        job.finish(finish, prompt_tokens=counter.counted, completion_tokens=tokens)


def _is_llama(obj: Any) -> bool:
    return any(
        c.__name__ == "Llama" and c.__module__.startswith("llama_cpp") for c in type(obj).__mro__
    )


class _PromptCounter:
    """Counts one generation's prompt tokens the way llama.cpp's ``usage`` does.

    A completion's prompt is tokenized as ``Llama.create_completion`` tokenizes it. A
    chat runs ``Llama.create_chat_completion`` with this counter standing in for the
    ``Llama`` (every attribute is the Llama's own, read and written through), so the
    chat handler's call to ``create_completion`` passes here and its prompt, already
    formatted and tokenized by the handler, is counted as it goes in. Nothing is
    patched on the shared object. Worker thread only.
    """

    def __init__(self, llm: Any) -> None:
        object.__setattr__(self, "_llm", llm)
        object.__setattr__(self, "counted", None)

    # Two names of its own (the rest are the Llama's): the Llama has neither.
    _llm: Any
    counted: int | None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._llm, name, value)

    def _count(self, prompt: Any) -> None:
        """Note how many tokens ``create_completion`` will make of ``prompt``."""
        tokenize = getattr(self._llm, "tokenize", None)
        if isinstance(prompt, list):
            tokens: int | None = len(prompt)  # already tokens (a chat handler's)
        elif isinstance(prompt, str) and callable(tokenize):
            # create_completion: BOS (and EOS) as the model's vocabulary asks, special
            # tokens written in the text parsed as such; "" is the BOS alone.
            tokens = len(tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
        else:
            tokens = None
        object.__setattr__(self, "counted", tokens)

    def create_completion(self, prompt: Any = "", *args: Any, **kwargs: Any) -> Any:
        """The Llama's ``create_completion``, counting the prompt it is given."""
        self._count(prompt)
        return self._llm.create_completion(prompt, *args, **kwargs)

    def _chat(self, messages: Any, kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """``create_chat_completion(messages=messages, **kwargs)``, counted if possible."""
        if not _is_llama(self._llm):
            chunks: Iterator[dict[str, Any]] = self._llm.create_chat_completion(
                messages=messages, **kwargs
            )
            return chunks
        # The Llama's own method with this counter as its ``self``: it picks the chat
        # handler from the Llama's settings and hands it ``llama=self``.
        method = type(self._llm).create_chat_completion
        chunks = method(self, messages=messages, **kwargs)
        return chunks
