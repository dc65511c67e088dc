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
import threading
from collections.abc import Iterator
from typing import Any

from .._core.channel import Request
from .._core.drivers import serve_async
from .._core.jobs import Job, JobQueue
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
    (``"length"`` / ``"stop"``) and the number of streamed tokens reach the
    :class:`~llmbridge.Completion`.

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
        chunks: Iterator[dict[str, Any]]
        if messages is not None:
            chunks = self.llm.create_chat_completion(messages=messages, **kwargs)
        else:
            chunks = self.llm.create_completion(request.prompt, **kwargs)
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
        job.finish(finish, completion_tokens=tokens)
