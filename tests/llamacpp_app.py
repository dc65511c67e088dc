"""A Flask app over a real ``llama_cpp.Llama``, for tests/test_llamacpp_real.py's servers.

The model is the GGUF at ``$LLAMACPP_MODEL`` (tests/tiny_gguf.py writes it). Two
``Llama`` objects on the same file: one behind an :class:`~llmbridge.Engine` with
:class:`~llmbridge.backends.LlamaCppBackend`, one shared through ``llmbridge.locked``.
``$LLAMACPP_TOKEN_DELAY`` (seconds) paces each decode step, so a test can leave a
stream long before it would end on its own.

Routes: ``/sse?p=&n=`` (the engine, SSE, greedy), ``/locked?p=&n=`` (``locked()``, a
plain-text stream, greedy), ``/stats`` (tokens decoded after their prompt, streams
still open in the engine's ``Llama``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import flask
import llama_cpp
from tiny_gguf import GREEDY, LLAMA_SETTINGS

from llmbridge import Engine, locked
from llmbridge.backends import LlamaCppBackend
from llmbridge.flask import FlaskBridge


class CountingLlama(llama_cpp.Llama):  # type: ignore[misc]
    """A ``Llama`` that counts the tokens it generates and the streams it has open."""

    def __init__(self, *args: Any, delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.generated = 0
        self.open_streams = 0
        self._counts = threading.Lock()

    def eval(self, tokens: Any) -> None:
        # One call per generated token after the prompt's (llama_cpp's generate loop).
        if self.delay:
            time.sleep(self.delay)
        super().eval(tokens)
        if len(tokens) == 1 and self.open_streams:
            with self._counts:
                self.generated += 1

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("stream"):
            return super().create_completion(*args, **kwargs)
        return self._watched(super().create_completion(*args, **kwargs))

    def _watched(self, chunks: Iterator[Any]) -> Iterator[Any]:
        with self._counts:
            self.open_streams += 1
        try:
            yield from chunks
        finally:
            chunks.close()
            with self._counts:
                self.open_streams -= 1


MODEL = os.environ["LLAMACPP_MODEL"]
engine_llm = CountingLlama(
    model_path=MODEL, delay=float(os.environ.get("LLAMACPP_TOKEN_DELAY", "0")), **LLAMA_SETTINGS
)
shared = locked(llama_cpp.Llama(model_path=MODEL, **LLAMA_SETTINGS))

app = flask.Flask(__name__)
bridge = FlaskBridge(app, engine=Engine(LlamaCppBackend(engine_llm)), heartbeat=None)


@app.get("/sse")
def sse() -> Any:
    args = flask.request.args
    return bridge.sse(args["p"], max_new_tokens=int(args["n"]), **GREEDY)


@app.get("/locked")
def locked_stream() -> Any:
    args = flask.request.args
    chunks = shared.create_completion(args["p"], max_tokens=int(args["n"]), stream=True, **GREEDY)

    def body() -> Iterator[str]:
        try:
            for chunk in chunks:
                yield chunk["choices"][0]["text"]
        finally:
            chunks.close()  # frees the lock if the client left mid-stream

    return flask.Response(body(), content_type="text/plain; charset=utf-8")


@app.get("/stats")
def stats() -> Any:
    return {"generated": engine_llm.generated, "open_streams": engine_llm.open_streams}
