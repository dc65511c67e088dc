"""A local Hugging Face transformers causal LM as a batching step generator.

:class:`TransformersGenerator` speaks the :class:`~llmbridge.backends.StepGenerator`
protocol (``enqueue`` / ``iterate`` / ``cancel``), so a
:class:`~llmbridge.backends.StepBackend` drives it from the engine thread: the model is
only ever touched by that one thread, requests join and leave the batch between decoding
steps, and each request's text streams to its own :class:`~llmbridge.Stream`.

Each ``iterate()`` advances every job by one token in one forward pass. The batch keeps
one KV cache; when a job joins, the batch is rebuilt (every sequence so far, left-padded,
in one prefill pass), when one leaves its row is dropped from the cache. Positions are
computed from the attention mask, so padding never changes a sequence's numbers.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._core.drivers import StepBackend
from .._core.guard import EntryGuard
from .._core.stream import Request
from .._exceptions import BadRequest

if TYPE_CHECKING:
    import torch

__all__ = ["TransformersGenerator", "TransformersJob", "transformers_backend"]

_INSTALL_HINT = (
    "the transformers backend needs torch and transformers: pip install torch "
    '"llmbridge[hf]" (pick the torch build for your hardware first)'
)


def _require_torch() -> None:
    """Import torch into this module's namespace, or raise an ``ImportError`` that says
    how to install it.

    Deferred to the first :class:`TransformersGenerator` rather than done at import, so
    that the adapter's names stay importable without torch: ``from llmbridge.backends
    import *``, ``hasattr`` and ``inspect.getmembers`` on ``llmbridge.backends`` must work
    in an app that never builds one.
    """
    if "torch" in globals():
        return
    try:
        module = importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    globals()["torch"] = module


def _cache_argument(model: Any) -> str:
    """The name ``model.forward`` takes the KV cache by: transformers 5 renamed
    ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned, under either version's name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@dataclass(eq=False)
class TransformersJob:
    """One request inside a :class:`TransformersGenerator` (its ``identifier`` is the
    request id). Built by :meth:`TransformersGenerator.make_job`."""

    identifier: str
    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    rng: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    # Incremental detokenisation (text is decoded from a window, never all again).
    _prefix_offset: int = 0
    _read_offset: int = 0
    _pending: str = ""


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TransformersGenerator:
    """A transformers causal LM behind ``enqueue`` / ``iterate`` / ``cancel``.

    ``model`` is a ``PreTrainedModel`` with a causal LM head, ``tokenizer`` its tokenizer
    (``encode`` / ``decode``; its ``eos_token_id`` ends a job). Request parameters read
    by :meth:`make_job`: ``max_new_tokens`` (or ``max_tokens``, default
    ``max_new_tokens``), ``temperature`` (0 or absent: greedy), ``top_p``, ``seed`` and
    ``stop`` (a string or a list of strings; the text ends before the first one).

    Raises ``ImportError`` (naming the install command) when torch is missing: the name
    itself imports without it, torch loads when the first generator is built.

    Not thread-safe, on purpose: drive it from one thread (a
    :class:`~llmbridge.backends.StepBackend` in an :class:`~llmbridge.Engine`). A second
    thread entering raises :class:`~llmbridge.ConcurrentEntryError` instead of corrupting
    the cache.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int = 64,
        device: Any = None,
    ) -> None:
        _require_torch()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device) if device is not None else model.device
        self.eos_token_id: int | None = tokenizer.eos_token_id
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_id or 0)
        config = model.config
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None) or (
            getattr(config, "n_positions", None)
        )
        self._cache_arg = _cache_argument(model)
        self._jobs: dict[str, TransformersJob] = {}
        self._rows: list[TransformersJob] = []  # the cache's batch rows, in order
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None
        self._guard = EntryGuard()
        #: Forward passes that advanced the batch by one token.
        self.steps = 0
        #: Forward passes that (re)built the batch from every sequence.
        self.prefills = 0
        #: Largest number of jobs advanced by one forward pass.
        self.max_batch_seen = 0
        #: Identifiers of jobs dropped by :meth:`cancel`, in order.
        self.cancelled: list[str] = []

    def __repr__(self) -> str:
        return f"<TransformersGenerator {type(self.model).__name__} jobs={len(self._jobs)}>"

    @property
    def jobs_in_flight(self) -> int:
        """Jobs enqueued and neither finished nor cancelled."""
        return len(self._jobs)

    # -- building jobs (engine thread) ----------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Gauges for :mod:`llmbridge.metrics`: ``gpu_memory_used_bytes`` (what torch has
        allocated on the model's CUDA device) when the model is on CUDA, else nothing.
        Cheap (no device sync); called on the engine thread."""
        if self.device.type != "cuda":
            return {}
        return {"gpu_memory_used_bytes": float(torch.cuda.memory_allocated(self.device))}

    def make_job(self, request: Request) -> TransformersJob:
        """Tokenise a request into a job. Raises :class:`~llmbridge.BadRequest` for an
        empty prompt, bad parameters, or one longer than the model's context."""
        params = request.params
        max_new = params.get("max_new_tokens", params.get("max_tokens", self.max_new_tokens))
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise BadRequest(f"max_new_tokens must be a positive int, got {max_new!r}")
        ids = list(self.tokenizer.encode(request.prompt))
        if not ids:
            raise BadRequest("the prompt is empty after tokenisation")
        if self.max_positions is not None and len(ids) + max_new > self.max_positions:
            raise BadRequest(
                f"{len(ids)} prompt tokens + {max_new} new tokens exceed the model's "
                f"context of {self.max_positions}"
            )
        stop = params.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            raise BadRequest(f"stop must be a string or a list of non-empty strings: {stop!r}")
        temperature = float(params.get("temperature") or 0.0)
        top_p = float(params.get("top_p") or 1.0)
        rng = None
        if temperature > 0:
            rng = torch.Generator(device="cpu")
            seed = params.get("seed")
            if seed is None:
                rng.seed()
            else:
                rng.manual_seed(int(seed))
        return TransformersJob(
            identifier=request.id,
            prompt_ids=ids,
            max_new_tokens=max_new,
            stop=tuple(stop),
            temperature=temperature,
            top_p=top_p,
            rng=rng,
        )

    # -- the StepGenerator protocol (one thread) ------------------------------------

    def enqueue(self, job: TransformersJob) -> None:
        """Add ``job``; it joins the batch at the next :meth:`iterate`."""
        with self._guard.enter("enqueue"):
            if job.identifier in self._jobs:
                raise KeyError(f"job {job.identifier!r} is already enqueued")
            self._jobs[job.identifier] = job

    def cancel(self, job: TransformersJob) -> None:
        """Drop ``job`` before the next decoding step (a no-op once it ended)."""
        with self._guard.enter("cancel"):
            if self._jobs.pop(job.identifier, None) is not None:
                self.cancelled.append(job.identifier)

    def iterate(self) -> list[dict[str, Any]]:
        """Advance every job by one token; return one result per job (``text`` may be
        empty while a possible stop string is held back)."""
        with self._guard.enter("iterate"), torch.inference_mode():
            return self._iterate()

    # -- internals --------------------------------------------------------------------

    def _iterate(self) -> list[dict[str, Any]]:
        jobs = self._jobs
        if not jobs:
            self._drop_cache()
            return []
        current = set(jobs)
        if any(job.identifier not in current for job in self._rows):
            self._select([i for i, job in enumerate(self._rows) if job.identifier in current])
        if self._cache is None or len(self._rows) != len(jobs):
            logits = self._prefill(list(jobs.values()))
        else:
            logits = self._decode()
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(self._rows))
        tokens = self._sample(logits)
        results = []
        for job, token in zip(self._rows, tokens, strict=True):
            result = self._advance(job, token)
            if result["eos"]:
                del jobs[job.identifier]
            results.append(result)
        return results

    def _drop_cache(self) -> None:
        self._rows = []
        self._cache = None
        self._mask = None
        self._next_pos = None

    def _select(self, keep: list[int]) -> None:
        """Keep only the cache rows ``keep`` (jobs that left are dropped in place)."""
        cache = self._cache
        if not keep or cache is None or not hasattr(cache, "batch_select_indices"):
            self._drop_cache()  # the next step rebuilds from the sequences
            return
        index = torch.tensor(keep, device=self.device)
        cache.batch_select_indices(index)
        assert self._mask is not None
        assert self._next_pos is not None
        self._mask = self._mask[index]
        self._next_pos = self._next_pos[index]
        self._rows = [self._rows[i] for i in keep]

    def _prefill(self, rows: list[TransformersJob]) -> torch.Tensor:
        sequences = [job.prompt_ids + job.generated for job in rows]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, sequence in enumerate(sequences):
            ids[i, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[i, width - len(sequence) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        self.prefills += 1
        self._rows = rows
        self._cache = _cache_of(out)
        self._mask = mask
        self._next_pos = positions[:, -1] + 1
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _decode(self) -> torch.Tensor:
        assert self._mask is not None
        assert self._next_pos is not None
        last = torch.tensor([[job.generated[-1]] for job in self._rows], device=self.device)
        ones = torch.ones((len(self._rows), 1), dtype=self._mask.dtype, device=self.device)
        mask = torch.cat([self._mask, ones], dim=1)
        out = self.model(
            input_ids=last,
            attention_mask=mask,
            position_ids=self._next_pos[:, None],
            use_cache=True,
            **{self._cache_arg: self._cache},
        )
        self._cache = _cache_of(out)
        self._mask = mask
        self._next_pos = self._next_pos + 1
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _sample(self, logits: torch.Tensor) -> list[int]:
        tokens: list[int] = logits.argmax(dim=-1).tolist()
        for i, job in enumerate(self._rows):
            if job.temperature <= 0:
                continue
            probs = torch.softmax(logits[i].float() / job.temperature, dim=-1).cpu()
            if job.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs > job.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens[i] = int(torch.multinomial(probs, 1, generator=job.rng).item())
        return tokens

    def _advance(self, job: TransformersJob, token: int) -> dict[str, Any]:
        result: dict[str, Any] = {"identifier": job.identifier, "job": job, "token_ids": [token]}
        if token == self.eos_token_id:
            return self._end(job, result, job._pending, "stop_token")
        job.generated.append(token)
        text = job._pending + self._detokenize(job)
        job._pending = ""
        if job.stop:
            cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
            if cut >= 0:
                return self._end(job, result, text[:cut], "stop_string")
            keep = _holdback(text, job.stop)
            if keep:
                text, job._pending = text[:-keep], text[-keep:]
        if len(job.generated) >= job.max_new_tokens:
            return self._end(job, result, text + job._pending, "max_new_tokens")
        result["text"] = text
        result["eos"] = False
        return result

    def _end(
        self, job: TransformersJob, result: dict[str, Any], text: str, reason: str
    ) -> dict[str, Any]:
        job._pending = ""
        result.update(
            text=text,
            eos=True,
            eos_reason=reason,
            prompt_tokens=len(job.prompt_ids),
            new_tokens=len(job.generated) + (reason == "stop_token"),
        )
        return result

    def _detokenize(self, job: TransformersJob) -> str:
        # Decode a sliding window: a token may complete a character (or a word piece)
        # started by the ones before it, so emit only text that is settled.
        ids = job.generated
        decode = self.tokenizer.decode
        before = decode(ids[job._prefix_offset : job._read_offset], skip_special_tokens=True)
        after = decode(ids[job._prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            job._prefix_offset, job._read_offset = job._read_offset, len(ids)
            return str(after[len(before) :])
        return ""


def transformers_backend(
    model: Any,
    tokenizer: Any,
    *,
    max_batch_size: int = 8,
    max_new_tokens: int = 64,
    device: Any = None,
) -> StepBackend:
    """A :class:`~llmbridge.backends.StepBackend` over a new
    :class:`TransformersGenerator`: ``Engine(transformers_backend(model, tokenizer))``.

    Up to ``max_batch_size`` requests decode together; the rest wait in the engine's
    queue. The generator is reachable as ``backend.generator``.
    """
    generator = TransformersGenerator(
        model, tokenizer, max_new_tokens=max_new_tokens, device=device
    )
    return StepBackend(generator, generator.make_job, max_batch_size=max_batch_size)
