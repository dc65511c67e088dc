"""Test and demo helpers: a simulated ExLlamaV2-style step generator.

:class:`SimulatedGenerator` behaves like ExLlamaV2's ``DynamicGenerator`` (``enqueue``,
``iterate``, ``cancel``), with realistic timing: each ``iterate()`` costs ``step_time``
times the number of jobs in flight to the power ``batch_exponent`` (sub-linear, like a
GPU batch). It is *not* thread-safe, on purpose, and unlike the real thing it notices:
two threads inside it at once raise :class:`~llmbridge.ConcurrentEntryError` and are
counted, so a test proves the single-owner invariant instead of hoping for it.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._core.guard import EntryGuard
from ._core.stream import Request

__all__ = ["SimulatedGenerator", "SimulatedJob", "simulated_engine"]

DEFAULT_VOCABULARY: tuple[str, ...] = (
    " the",
    " a",
    " model",
    " token",
    " stream",
    " engine",
    " thread",
    " loop",
    " request",
    " flask",
    " quart",
    " batch",
    " fast",
    " correct",
    " concurrent",
    " bridge",
    " owner",
    " every",
    " one",
    " its",
    " own",
    " text",
    " and",
    " of",
    ",",
    ".",
    " is",
    " runs",
    " never",
    " blocks",
    " waits",
    " for",
    " you",
    " we",
    " it",
    " in",
    " on",
    " to",
)


@dataclass(eq=False)
class SimulatedJob:
    """A job for :class:`SimulatedGenerator`, shaped like ExLlamaV2's ``DynamicJob``.

    ``error_after`` makes the job fail (a result carrying ``error``) after that many
    tokens, to test per-request errors.
    """

    identifier: str
    prompt: str
    max_new_tokens: int = 16
    seed: int | None = None
    error_after: int | None = None
    generated: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(_seed_for(self.prompt, self.seed))


def _seed_for(prompt: str, seed: int | None) -> int:
    digest = hashlib.blake2b(f"{seed}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class SimulatedGenerator:
    """An ExLlamaV2-style step generator with simulated cost and a concurrency detector.

    The text of a job is a deterministic function of its prompt, seed and length
    (:meth:`expected_text`), different for every prompt, so a test can check that each
    stream got exactly its own tokens. ``tokens_per_step`` tokens are produced per job per
    ``iterate()``.

    Not thread-safe: only one thread may be inside ``enqueue``/``iterate``/``cancel``.
    """

    def __init__(
        self,
        *,
        step_time: float = 0.002,
        batch_exponent: float = 0.5,
        tokens_per_step: int = 1,
        max_new_tokens: int = 16,
        vocabulary: Sequence[str] = DEFAULT_VOCABULARY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if step_time < 0:
            raise ValueError(f"step_time must be >= 0, got {step_time!r}")
        if tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step!r}")
        if not vocabulary:
            raise ValueError("vocabulary must not be empty")
        self.step_time = step_time
        self.batch_exponent = batch_exponent
        self.tokens_per_step = tokens_per_step
        self.max_new_tokens = max_new_tokens
        self.vocabulary = tuple(vocabulary)
        self._sleep = sleep
        self._jobs: dict[str, SimulatedJob] = {}
        self._paused: set[str] = set()
        self._guard = EntryGuard()
        self._fail_next: BaseException | None = None
        #: Number of completed ``iterate()`` calls.
        self.steps = 0
        #: Identifiers of jobs dropped by :meth:`cancel`, in order.
        self.cancelled: list[str] = []
        #: Total jobs ever enqueued.
        self.enqueued = 0
        #: Largest number of jobs in flight seen by one ``iterate()``.
        self.max_batch_seen = 0
        #: Times a job was paused because its reader fell behind.
        self.pauses = 0
        _generators.add(self)

    def __repr__(self) -> str:
        return f"<SimulatedGenerator jobs={len(self._jobs)} steps={self.steps}>"

    @property
    def concurrent_entries(self) -> int:
        """Times a second thread entered while another was inside (should stay 0)."""
        return self._guard.concurrent_entries

    @property
    def threads(self) -> set[int]:
        """``threading.get_ident()`` of every thread that entered."""
        return self._guard.threads

    @property
    def jobs_in_flight(self) -> int:
        """Jobs enqueued and neither finished nor cancelled."""
        return len(self._jobs)

    def make_job(self, request: Request) -> SimulatedJob:
        """Build a job from a request: ``max_new_tokens``, ``seed`` and ``error_after``
        come from ``request.params``."""
        params = request.params
        max_new = params.get("max_new_tokens", params.get("max_tokens", self.max_new_tokens))
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new!r}")
        return SimulatedJob(
            identifier=request.id,
            prompt=request.prompt,
            max_new_tokens=max_new,
            seed=params.get("seed"),
            error_after=params.get("error_after"),
        )

    def expected_text(
        self, prompt: str, max_new_tokens: int | None = None, seed: int | None = None
    ) -> str:
        """The exact text a job for ``prompt`` produces."""
        rng = random.Random(_seed_for(prompt, seed))
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        vocab = self.vocabulary
        return "".join(vocab[rng.randrange(len(vocab))] for _ in range(n))

    def fail_next_iterate(self, error: BaseException) -> None:
        """Make the next ``iterate()`` raise ``error`` (a crash of the whole generator)."""
        self._fail_next = error

    def enqueue(self, job: SimulatedJob) -> None:
        """Add ``job`` to the batch."""
        with self._guard.enter("enqueue"):
            if job.identifier in self._jobs:
                raise KeyError(f"job {job.identifier!r} is already enqueued")
            self._jobs[job.identifier] = job
            self.enqueued += 1

    def cancel(self, job: SimulatedJob) -> None:
        """Drop ``job`` from the batch (a no-op if it already ended)."""
        with self._guard.enter("cancel"):
            self._paused.discard(job.identifier)
            if self._jobs.pop(job.identifier, None) is not None:
                self.cancelled.append(job.identifier)

    def pause(self, job: SimulatedJob) -> None:
        """Skip ``job`` in ``iterate()`` until :meth:`resume` (its reader fell behind)."""
        with self._guard.enter("pause"):
            if job.identifier in self._jobs:
                self._paused.add(job.identifier)
                self.pauses += 1

    def resume(self, job: SimulatedJob) -> None:
        """Step ``job`` again."""
        with self._guard.enter("resume"):
            self._paused.discard(job.identifier)

    @property
    def paused(self) -> int:
        """Jobs paused right now."""
        return len(self._paused)

    def iterate(self) -> list[dict[str, Any]]:
        """Advance every job by ``tokens_per_step`` tokens; return one result per job."""
        with self._guard.enter("iterate"):
            if self._fail_next is not None:
                error, self._fail_next = self._fail_next, None
                self._jobs.clear()
                self._paused.clear()
                raise error
            n = len(self._jobs)
            self.max_batch_seen = max(self.max_batch_seen, n)
            if n and self.step_time:
                self._sleep(self.step_time * n**self.batch_exponent)
            results: list[dict[str, Any]] = []
            vocab = self.vocabulary
            paused = self._paused
            for job in list(self._jobs.values()):
                if job.identifier in paused:
                    continue
                if job.error_after is not None and job.generated >= job.error_after:
                    del self._jobs[job.identifier]
                    results.append(
                        {
                            "identifier": job.identifier,
                            "job": job,
                            "error": RuntimeError(
                                f"simulated failure after {job.generated} tokens"
                            ),
                        }
                    )
                    continue
                count = min(self.tokens_per_step, job.max_new_tokens - job.generated)
                text = "".join(vocab[job._rng.randrange(len(vocab))] for _ in range(count))
                job.generated += count
                eos = job.generated >= job.max_new_tokens
                result: dict[str, Any] = {
                    "identifier": job.identifier,
                    "job": job,
                    "stage": "streaming",
                    "text": text,
                    "token_ids": [0] * count,
                    "eos": eos,
                }
                if eos:
                    del self._jobs[job.identifier]
                    result["eos_reason"] = "max_new_tokens"
                    result["new_tokens"] = job.generated
                    result["prompt_tokens"] = len(job.prompt.split())
                results.append(result)
            self.steps += 1
            return results


_generators: weakref.WeakSet[SimulatedGenerator] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A thread that was inside a generator at fork time stayed in the parent.
    for generator in list(_generators):
        generator._guard.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def simulated_engine(
    *,
    step_time: float = 0.002,
    max_new_tokens: int = 16,
    max_batch_size: int = 64,
    max_queued: int = 1024,
    **options: Any,
) -> Any:
    """An :class:`~llmbridge.Engine` over a fresh :class:`SimulatedGenerator`.

    The generator is reachable as ``engine.backend.generator``. Extra ``options`` go to
    the generator (``tokens_per_step``, ``batch_exponent``, ``vocabulary``).
    """
    from ._core.drivers import StepBackend
    from ._core.engine import Engine

    generator = SimulatedGenerator(step_time=step_time, max_new_tokens=max_new_tokens, **options)
    backend = StepBackend(generator, generator.make_job, max_batch_size=max_batch_size)
    return Engine(backend, max_queued=max_queued, name="simulated")
