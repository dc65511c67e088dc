"""ExLlamaV2's ``DynamicGenerator`` behind an engine.

ExLlamaV2's dynamic generator already batches many jobs and steps them with
``iterate()``, but it is not thread-safe: Flask request threads calling ``iterate()``
steal each other's results. Here the engine thread alone drives it through a
:class:`~llmbridge.backends.StepBackend`; :func:`exllamav2_job_factory` turns each
request into an ``ExLlamaV2DynamicJob`` and :class:`ExLlamaV2Adapter` normalises the
generator's results (``token_ids`` tensors, ``eos_reason`` values) for the engine.

Nothing here imports ``exllamav2`` or torch until a job is built without explicit
``job_class`` / ``settings_class``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .._core.drivers import StepBackend
from .._core.stream import Request
from .._exceptions import BadRequest

__all__ = ["ExLlamaV2Adapter", "exllamav2_backend", "exllamav2_job_factory"]

# ExLlamaV2's eos reasons -> the engine's (StepBackend maps "max_new_tokens" to "length").
_REASONS = {
    "stop_token": "stop",
    "stop_string": "stop",
    "end_filter": "stop",
    "max_new_tokens": "max_new_tokens",
}


def _token_list(token_ids: Any) -> list[int]:
    """ExLlamaV2 reports ``token_ids`` as a ``(1, n)`` tensor: flatten it to a list."""
    if hasattr(token_ids, "flatten"):
        return [int(t) for t in token_ids.flatten().tolist()]
    flat: list[int] = []
    for item in token_ids:
        if isinstance(item, list | tuple):
            flat.extend(int(t) for t in item)
        else:
            flat.append(int(item))
    return flat


class ExLlamaV2Adapter:
    """A :class:`~llmbridge.backends.StepGenerator` over an ``ExLlamaV2DynamicGenerator``.

    ``enqueue`` and ``cancel`` pass through; ``iterate`` returns the generator's results
    with ``token_ids`` as a flat list (so the engine counts tokens right, not tensor
    rows) and ``eos_reason`` mapped onto the engine's reasons. Like the generator it
    wraps, it is not thread-safe: only the engine thread may call it.
    """

    def __init__(self, generator: Any) -> None:
        for method in ("enqueue", "iterate", "cancel"):
            if not callable(getattr(generator, method, None)):
                raise TypeError(f"ExLlamaV2Adapter needs a generator with {method}()")
        self.generator = generator

    def __repr__(self) -> str:
        return f"ExLlamaV2Adapter({self.generator!r})"

    def enqueue(self, job: Any) -> Any:
        """Hand ``job`` (an ``ExLlamaV2DynamicJob``) to the generator."""
        return self.generator.enqueue(job)

    def cancel(self, job: Any) -> Any:
        """Drop ``job`` from the generator, freeing its cache pages."""
        return self.generator.cancel(job)

    def iterate(self) -> list[dict[str, Any]]:
        """One generator step; results normalised for the engine."""
        results: list[dict[str, Any]] = []
        for result in self.generator.iterate():
            out = dict(result)
            if out.get("token_ids") is not None:
                out["token_ids"] = _token_list(out["token_ids"])
            reason = out.get("eos_reason")
            if reason is not None:
                out["eos_reason"] = _REASONS.get(str(reason), "stop")
            results.append(out)
        return results


def exllamav2_job_factory(
    tokenizer: Any,
    *,
    max_new_tokens: int = 256,
    stop_conditions: Sequence[int | str] = (),
    gen_settings: Any = None,
    add_bos: bool = True,
    encode_special_tokens: bool = False,
    job_class: Any = None,
    settings_class: Any = None,
) -> Callable[[Request], Any]:
    """``make_job(request) -> ExLlamaV2DynamicJob`` for a :class:`StepBackend`.

    The prompt is encoded with ``tokenizer.encode(prompt, add_bos=...,
    encode_special_tokens=...)``; the job stops at ``tokenizer.eos_token_id``, at each
    of ``stop_conditions`` and at the request's ``stop`` strings. Request parameters:
    ``max_new_tokens`` (or ``max_tokens``), ``temperature`` (0 means greedy), ``top_p``,
    ``top_k``, ``seed``. ``gen_settings`` (an ``ExLlamaV2Sampler.Settings``) is the base
    each job's settings are cloned from. The job's ``identifier`` is the request id.

    ``job_class`` / ``settings_class`` default to ``exllamav2.generator``'s
    ``ExLlamaV2DynamicJob`` and ``ExLlamaV2Sampler.Settings`` (imported on first use);
    pass your own to wrap a subclass. A bad parameter raises
    :class:`~llmbridge.BadRequest`, failing only that request.
    """

    def make_job(request: Request) -> Any:
        nonlocal job_class, settings_class
        if job_class is None or settings_class is None:
            try:
                from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "the ExLlamaV2 backend needs exllamav2: pip install exllamav2 (the "
                    "build for your GPU: see https://github.com/turboderp/exllamav2)"
                ) from exc
            job_class = job_class or ExLlamaV2DynamicJob
            settings_class = settings_class or ExLlamaV2Sampler.Settings
        params = request.params
        max_new = params.get("max_new_tokens", params.get("max_tokens", max_new_tokens))
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise BadRequest(f"max_new_tokens must be a positive int, got {max_new!r}")
        stops: list[int | str] = []
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            stops.append(eos)
        stops.extend(stop_conditions)
        extra = params.get("stop") or ()
        stops.extend([extra] if isinstance(extra, str) else extra)
        settings = gen_settings.clone() if gen_settings is not None else settings_class()
        temperature = params.get("temperature")
        if temperature is not None:
            if float(temperature) <= 0:
                settings.top_k = 1  # greedy
            else:
                settings.temperature = float(temperature)
        for name in ("top_p", "top_k"):
            if params.get(name) is not None:
                setattr(settings, name, params[name])
        input_ids = tokenizer.encode(
            request.prompt, add_bos=add_bos, encode_special_tokens=encode_special_tokens
        )
        return job_class(
            input_ids=input_ids,
            max_new_tokens=max_new,
            stop_conditions=stops,
            gen_settings=settings,
            identifier=request.id,
            seed=params.get("seed"),
        )

    return make_job


def exllamav2_backend(
    generator: Any,
    tokenizer: Any,
    *,
    max_batch_size: int = 32,
    **job_options: Any,
) -> StepBackend:
    """An engine backend over an ``ExLlamaV2DynamicGenerator``::

        engine = Engine(exllamav2_backend(generator, tokenizer, max_batch_size=16))

    ``max_batch_size`` caps jobs inside the generator at once (keep it at or below the
    generator's own ``max_batch_size``); ``job_options`` go to
    :func:`exllamav2_job_factory`.
    """
    return StepBackend(
        ExLlamaV2Adapter(generator),
        exllamav2_job_factory(tokenizer, **job_options),
        max_batch_size=max_batch_size,
    )
