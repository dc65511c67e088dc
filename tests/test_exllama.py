"""The ExLlamaV2 adapter and job factory, against a faithful fake of ExLlamaV2's API.

exllamav2 needs a CUDA GPU and model weights, neither of which CI has, so the fake below
mirrors the parts llmbridge touches: ``ExLlamaV2DynamicJob``'s keyword-only constructor,
``ExLlamaV2Sampler.Settings`` with ``clone()``, a tokenizer whose ``encode`` returns a
``(1, n)`` tensor-like, and a ``DynamicGenerator`` whose ``iterate()`` returns result
dicts shaped like the real ones (``job``, ``stage``, ``identifier``, ``eos``, ``text``,
``token_ids`` as ``(1, n)``, ``eos_reason``, ``new_tokens``, ``prompt_tokens``). Like the
real generator it is not thread-safe; unlike it, it notices a second thread.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmbridge import BadRequest, ConcurrentEntryError, Engine
from llmbridge.backends import ExLlamaV2Adapter, exllamav2_backend, exllamav2_job_factory

from support import wait_until

WORDS = [" red", " green", " blue", " cat", " dog", " sun", " END", " moon"]


class FakeTensor:
    """A ``(1, n)`` integer tensor: only what ExLlamaV2 callers use."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows
        self.shape = (len(rows), len(rows[0]) if rows else 0)

    def flatten(self) -> FakeTensor:
        return FakeTensor([[t for row in self.rows for t in row]])

    def tolist(self) -> list[int]:
        return [t for row in self.rows for t in row]


class FakeTokenizer:
    """Word-level: each token id picks a word of ``WORDS``; id 99 is EOS."""

    eos_token_id = 99

    def encode(self, text: str, add_bos: bool = False, encode_special_tokens: bool = False):
        ids = [1] if add_bos else []
        ids += [len(word) for word in text.split()]
        return FakeTensor([ids])


class Settings:
    """``ExLlamaV2Sampler.Settings``: sampling knobs with ``clone()``."""

    def __init__(self) -> None:
        self.temperature = 0.8
        self.top_k = 50
        self.top_p = 0.8

    def clone(self) -> Settings:
        copy = Settings()
        copy.__dict__.update(self.__dict__)
        return copy


class FakeDynamicJob:
    """``ExLlamaV2DynamicJob``: keyword-only, rejects arguments the real one lacks."""

    def __init__(
        self,
        *,
        input_ids: FakeTensor,
        max_new_tokens: int,
        stop_conditions: list[int | str] | None = None,
        gen_settings: Settings | None = None,
        identifier: Any = None,
        seed: int | None = None,
        min_new_tokens: int = 0,
    ) -> None:
        assert isinstance(input_ids, FakeTensor)
        assert input_ids.shape[0] == 1
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.stop_conditions = stop_conditions or []
        self.gen_settings = gen_settings or Settings()
        self.identifier = identifier
        self.seed = seed
        self.generated: list[int] = []
        self.text = ""
        digest = hashlib.blake2b(repr(input_ids.tolist()).encode(), digest_size=8).digest()
        self.state = int.from_bytes(digest, "big")

    def next_token(self) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % 2**64
        return (self.state >> 33) % len(WORDS)


@dataclass
class FakeDynamicGenerator:
    """``ExLlamaV2DynamicGenerator``: enqueue / iterate / cancel / num_remaining_jobs."""

    jobs: list[FakeDynamicJob] = field(default_factory=list)
    cancelled: list[Any] = field(default_factory=list)
    concurrent_entries: int = 0
    max_batch_seen: int = 0
    serial: int = 0
    #: When set, each ``iterate()`` waits for it first (a test lets requests pile up).
    hold: threading.Event | None = None
    _entry: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self) -> None:
        if not self._entry.acquire(blocking=False):
            self.concurrent_entries += 1
            raise ConcurrentEntryError("a second thread entered the generator")

    def enqueue(self, job: FakeDynamicJob) -> int:
        self._enter()
        try:
            self.jobs.append(job)
            self.serial += 1
            return self.serial
        finally:
            self._entry.release()

    def cancel(self, job: FakeDynamicJob) -> None:
        self._enter()
        try:
            if job in self.jobs:
                self.jobs.remove(job)
                self.cancelled.append(job.identifier)
        finally:
            self._entry.release()

    def num_remaining_jobs(self) -> int:
        return len(self.jobs)

    def iterate(self) -> list[dict[str, Any]]:
        self._enter()
        try:
            if self.hold is not None:
                self.hold.wait(20)
            self.max_batch_seen = max(self.max_batch_seen, len(self.jobs))
            results: list[dict[str, Any]] = []
            for job in list(self.jobs):
                base = {"job": job, "stage": "streaming", "identifier": job.identifier}
                if not job.generated and not job.text:
                    results.append({**base, "stage": "started", "eos": False})
                token = job.next_token()
                job.generated.append(token)
                piece = WORDS[token]
                result: dict[str, Any] = {
                    **base,
                    "eos": False,
                    "serial": 0,
                    "text": piece,
                    "token_ids": FakeTensor([[token]]),
                }
                reason = None
                strings = [s for s in job.stop_conditions if isinstance(s, str)]
                hit = next((s for s in strings if s in job.text + piece), None)
                if hit is not None:
                    cut = (job.text + piece).index(hit)
                    result["text"] = (job.text + piece)[len(job.text) : cut]
                    reason = "stop_string"
                elif len(job.generated) >= job.max_new_tokens:
                    reason = "max_new_tokens"
                job.text += result["text"]
                if reason is not None:
                    self.jobs.remove(job)
                    result.update(
                        eos=True,
                        eos_reason=reason,
                        full_completion=job.text,
                        new_tokens=len(job.generated),
                        prompt_tokens=job.input_ids.shape[1],
                    )
                results.append(result)
            return results
        finally:
            self._entry.release()


def expected(prompt: str, n: int, stop: str | None = None) -> str:
    """The text the fake produces for ``prompt`` (add_bos) in ``n`` tokens."""
    job = FakeDynamicJob(input_ids=FakeTokenizer().encode(prompt, add_bos=True), max_new_tokens=n)
    text = "".join(WORDS[job.next_token()] for _ in range(n))
    if stop is not None and stop in text:
        text = text[: text.index(stop)]
    return text


def make_engine(generator: FakeDynamicGenerator, **options: Any) -> Engine:
    backend = exllamav2_backend(
        generator,
        FakeTokenizer(),
        max_batch_size=8,
        job_class=FakeDynamicJob,
        settings_class=Settings,
        **options,
    )
    return Engine(backend)


@pytest.mark.timeout(30)
def test_many_threads_each_get_their_own_text() -> None:
    """40 request threads share one generator through the engine: exact, batched, one owner.
    The generator holds its first step until all 40 are submitted, so batching is
    certain however the threads are scheduled."""
    generator = FakeDynamicGenerator(hold=threading.Event())
    results: dict[int, str] = {}
    with make_engine(generator) as engine:

        def worker(i: int) -> None:
            results[i] = (
                engine.submit(f"prompt number {i} " * (i % 3 + 1), max_new_tokens=6 + i % 5)
                .result(20)
                .text
            )

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        assert wait_until(lambda: engine.queued + engine.in_flight == 40)
        assert generator.hold is not None
        generator.hold.set()
        for t in threads:
            t.join(30)
    assert results == {
        i: expected(f"prompt number {i} " * (i % 3 + 1), 6 + i % 5) for i in range(40)
    }
    assert generator.concurrent_entries == 0
    assert generator.max_batch_seen > 1


@pytest.mark.timeout(30)
def test_token_counts_and_finish_reasons() -> None:
    """(1, n) token tensors count n tokens; max_new_tokens is 'length', a stop string 'stop'."""
    generator = FakeDynamicGenerator()
    with make_engine(generator) as engine:
        done = engine.submit("count me", max_new_tokens=7).result(20)
        full = expected("count me", 40)
        stop = next(w for w in WORDS if w in full[len(WORDS[0]) :])
        stopped = engine.submit("count me", max_new_tokens=40, stop=[stop]).result(20)
    assert done.completion_tokens == 7
    assert done.prompt_tokens == 3  # BOS + two words
    assert done.finish_reason == "length"
    assert stopped.finish_reason == "stop"
    assert stopped.text == expected("count me", 40, stop)


@pytest.mark.timeout(30)
def test_job_factory_builds_real_shaped_jobs() -> None:
    """The factory passes ids, limits, stops (EOS first), settings and the request id."""
    base = Settings()
    make_job = exllamav2_job_factory(
        FakeTokenizer(),
        stop_conditions=["\n\n"],
        gen_settings=base,
        job_class=FakeDynamicJob,
        settings_class=Settings,
    )
    from llmbridge import Request

    job = make_job(
        Request("req-x", "two words", {"max_tokens": 5, "stop": "!", "temperature": 0, "seed": 3})
    )
    assert job.identifier == "req-x"
    assert job.max_new_tokens == 5
    assert job.stop_conditions == [99, "\n\n", "!"]
    assert job.gen_settings is not base
    assert job.gen_settings.top_k == 1  # temperature 0: greedy
    assert job.seed == 3
    assert job.input_ids.tolist() == [1, 3, 5]
    with pytest.raises(BadRequest):
        make_job(Request("req-y", "x", {"max_new_tokens": -1}))


@pytest.mark.timeout(30)
def test_cancel_reaches_generator_cancel() -> None:
    """A consumer that leaves has its job cancelled in the generator; others finish."""
    generator = FakeDynamicGenerator()
    with make_engine(generator) as engine:
        long = engine.submit("long one", max_new_tokens=100_000)
        short = engine.submit("short one", max_new_tokens=20)
        next(iter(long))
        long.cancel()
        assert short.result(20).text == expected("short one", 20)
        engine.submit("flush", max_new_tokens=1).result(20)  # one more step boundary
    assert long.id in generator.cancelled
    assert generator.jobs == []


@pytest.mark.timeout(10)
def test_adapter_refuses_non_generators() -> None:
    """Anything without enqueue/iterate/cancel is refused up front."""
    with pytest.raises(TypeError, match="enqueue"):
        ExLlamaV2Adapter(object())
