"""Backends an :class:`~llmbridge.Engine` can drive.

- :class:`StepBackend` drives an ExLlamaV2-style step generator (``enqueue``,
  ``iterate``, ``cancel``) with many jobs in flight.
- :class:`CallableBackend` runs ``fn(prompt, **params)``: sync or async, returning text
  or yielding chunks. ``Engine(fn)`` wraps a callable in it for you.
- :class:`AsyncBackend` is the protocol for a coroutine-per-request backend run on the
  engine's own event loop; :func:`serve_async` runs one.
- :class:`Backend` is the protocol the engine itself drives.

Adapters to real engines, each imported only when first used (``import
llmbridge.backends`` never imports httpx, torch or transformers):

- :class:`OpenAIBackend`: any OpenAI-compatible HTTP API (``llmbridge[http]``), over
  one or several :class:`Upstream` servers (balanced, with failover).
- :class:`TransformersGenerator` / :func:`transformers_backend`: a local Hugging Face
  causal LM, batched (``llmbridge[hf]`` plus torch).
- :class:`ExLlamaV2Adapter` / :func:`exllamav2_job_factory` /
  :func:`exllamav2_backend`: ExLlamaV2's ``DynamicGenerator``.
- :class:`LlamaCppBackend`: a ``llama_cpp.Llama``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._core.drivers import AsyncBackend, CallableBackend, StepBackend, StepGenerator, serve_async
from ._core.jobs import Backend, Job, JobQueue, JobSink

if TYPE_CHECKING:
    from ._backends.exllama import ExLlamaV2Adapter, exllamav2_backend, exllamav2_job_factory
    from ._backends.llamacpp import LlamaCppBackend
    from ._backends.openai import OpenAIBackend
    from ._backends.openai.upstreams import Upstream
    from ._backends.transformers import TransformersGenerator, transformers_backend

__all__ = [
    "AsyncBackend",
    "Backend",
    "CallableBackend",
    "ExLlamaV2Adapter",
    "Job",
    "JobQueue",
    "JobSink",
    "LlamaCppBackend",
    "OpenAIBackend",
    "StepBackend",
    "StepGenerator",
    "TransformersGenerator",
    "Upstream",
    "exllamav2_backend",
    "exllamav2_job_factory",
    "serve_async",
    "transformers_backend",
]

# Optional adapters: name -> module, imported on first access so that their heavy
# dependencies (httpx, torch, transformers) load only for the apps that use them.
_LAZY = {
    "ExLlamaV2Adapter": "._backends.exllama",
    "exllamav2_backend": "._backends.exllama",
    "exllamav2_job_factory": "._backends.exllama",
    "LlamaCppBackend": "._backends.llamacpp",
    "OpenAIBackend": "._backends.openai",
    "TransformersGenerator": "._backends.transformers",
    "transformers_backend": "._backends.transformers",
    "Upstream": "._backends.openai.upstreams",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __package__), name)
    globals()[name] = value
    return value
