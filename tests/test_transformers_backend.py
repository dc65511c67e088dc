"""The transformers backend on a tiny randomly-initialised GPT-2, on the CPU, for real.

The model (2 layers, hidden 32) and a character-level tokenizer are built here: no
download, no hub. Float64 weights keep batched and one-at-a-time logits equal to the last
bit, so greedy text is compared exactly: against ``model.generate`` and across batch
shapes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("CI"):
    # CI installs the CPU build of torch (.ci/run): there these tests must run, not skip.
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch", reason='pip install torch==2.13.0 "llmbridge[hf]"')
    transformers = pytest.importorskip("transformers", reason='pip install "llmbridge[hf]"')

from llmbridge import BadRequest, Engine
from llmbridge.backends import TransformersGenerator, transformers_backend

CHARS = " abcdefghijklmnopqrstuvwxyz.,!?'"


def make_tokenizer() -> Any:
    """A character-level fast tokenizer: one token per character, <eos> and <pad>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model(seed: int = 0) -> Any:
    """A 2-layer GPT-2 with hidden size 32 over the tokenizer's vocabulary, in float64."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(CHARS) + 3,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


@pytest.fixture(scope="module")
def parts() -> tuple[Any, Any]:
    """One tiny model and tokenizer, shared by the module's tests (read-only)."""
    return make_model(), make_tokenizer()


def reference(model: Any, tokenizer: Any, prompt: str, n: int) -> str:
    """Greedy text from transformers' own ``generate``: the ground truth."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


@pytest.fixture
def engine(parts: tuple[Any, Any]) -> Iterator[Engine]:
    """An engine over the tiny model, batching up to 8 requests."""
    model, tokenizer = parts
    with Engine(transformers_backend(model, tokenizer, max_batch_size=8)) as eng:
        yield eng


PROMPTS = ["hello", "the quick brown fox", "a", "batching, left padding!", "why?"]


@pytest.mark.timeout(60)
def test_generates_what_transformers_generate_does(parts: tuple[Any, Any], engine: Engine) -> None:
    """One request at a time, the text equals greedy model.generate() exactly."""
    model, tokenizer = parts
    for prompt in PROMPTS:
        done = engine.submit(prompt, max_new_tokens=12).result(30)
        assert done.text == reference(model, tokenizer, prompt, 12)
        assert done.prompt_tokens == len(prompt)


@pytest.mark.timeout(60)
def test_concurrent_requests_batch_and_each_get_their_own_text(
    parts: tuple[Any, Any], engine: Engine
) -> None:
    """Prompts of different lengths submitted together decode in one batch, each exact."""
    model, tokenizer = parts
    lengths = [5, 17, 9, 12, 3]
    streams = [engine.submit(p, max_new_tokens=n) for p, n in zip(PROMPTS, lengths, strict=True)]
    texts = [s.result(30).text for s in streams]
    expected = [reference(model, tokenizer, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    assert texts == expected
    generator = engine.backend.generator  # type: ignore[attr-defined]
    assert generator.max_batch_seen >= 2
    assert generator.steps < sum(lengths)  # batched: fewer forward passes than tokens


@pytest.mark.timeout(60)
def test_requests_joining_mid_batch_stay_exact(parts: tuple[Any, Any], engine: Engine) -> None:
    """Requests submitted while others are decoding join the batch and stay exact."""
    model, tokenizer = parts
    first = engine.submit("the quick brown fox", max_new_tokens=40)
    iterator = iter(first)
    head = next(iterator) + next(iterator)  # it is decoding now
    late = [engine.submit(p, max_new_tokens=10) for p in PROMPTS]
    text = head + "".join(iterator)
    assert text == reference(model, tokenizer, "the quick brown fox", 40)
    for prompt, stream in zip(PROMPTS, late, strict=True):
        assert stream.result(30).text == reference(model, tokenizer, prompt, 10)
    assert engine.backend.generator.prefills >= 2  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_streams_token_by_token(engine: Engine) -> None:
    """A stream yields its text in pieces as the tokens are decoded."""
    chunks = list(engine.submit("stream me", max_new_tokens=15))
    assert len(chunks) > 1
    done = engine.submit("stream me", max_new_tokens=15).result(30)
    assert "".join(chunks) == done.text
    assert done.finish_reason == "length"
    assert done.completion_tokens == 15


@pytest.mark.timeout(60)
def test_cancel_drops_the_job_between_steps(engine: Engine) -> None:
    """Cancelling a running request removes it from the batch; the others go on, exact."""
    generator = engine.backend.generator  # type: ignore[attr-defined]
    keep = engine.submit("keep going", max_new_tokens=60)
    doomed = engine.submit("stop soon", max_new_tokens=100)
    next(iter(doomed))
    doomed.cancel()
    done = keep.result(30)
    assert done.completion_tokens == 60
    assert doomed.id in generator.cancelled
    assert generator.jobs_in_flight == 0
    assert len(engine.submit("keep going", max_new_tokens=60).result(30).text) == len(done.text)


@pytest.mark.timeout(60)
def test_stop_strings_cut_the_text(parts: tuple[Any, Any], engine: Engine) -> None:
    """A stop string ends the request before it; the held-back prefix never leaks."""
    model, tokenizer = parts
    full = reference(model, tokenizer, "hello", 30)
    stop = full[10:13]
    done = engine.submit("hello", max_new_tokens=30, stop=[stop, "never there"]).result(30)
    assert done.text == full[: full.find(stop)]
    assert done.finish_reason == "stop"
    chunks = list(engine.submit("hello", max_new_tokens=30, stop=stop))
    assert "".join(chunks) == done.text


@pytest.mark.timeout(60)
def test_sampling_is_seeded_per_request(engine: Engine) -> None:
    """With temperature > 0, one seed gives one text, in a batch or alone."""
    alone = engine.submit("dice", max_new_tokens=20, temperature=1.0, seed=7).result(30)
    batch = [engine.submit("dice", max_new_tokens=20, temperature=1.0, seed=s) for s in (7, 8, 9)]
    texts = [s.result(30).text for s in batch]
    assert texts[0] == alone.text
    assert len(set(texts)) > 1


@pytest.mark.timeout(60)
def test_bad_requests_fail_alone(engine: Engine) -> None:
    """Over-long prompts and bad parameters fail their own request with BadRequest."""
    with pytest.raises(BadRequest, match="context"):
        engine.submit("x" * 120, max_new_tokens=20).result(30)
    with pytest.raises(BadRequest, match="max_new_tokens"):
        engine.submit("x", max_new_tokens=0).result(30)
    with pytest.raises(BadRequest, match="empty"):
        engine.submit("", max_new_tokens=3).result(30)
    assert engine.submit("still fine", max_new_tokens=3).result(30).completion_tokens == 3


@pytest.mark.timeout(60)
def test_many_threads_one_owner(parts: tuple[Any, Any], engine: Engine) -> None:
    """24 request threads at once: only the engine thread ever entered the model."""
    model, _ = parts
    entered: set[int] = set()
    original = model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        entered.add(threading.get_ident())
        return original(*args, **kwargs)

    model.forward = spy
    results: dict[int, str] = {}
    try:

        def worker(i: int) -> None:
            results[i] = engine.submit(f"thread {i % 6}", max_new_tokens=6).result(30).text

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        del model.forward
    assert entered == {engine.thread.ident}  # type: ignore[union-attr]
    for i, text in results.items():
        assert text == results[i % 6]
    assert len(results) == 24


@pytest.mark.timeout(30)
def test_second_thread_entering_is_detected(parts: tuple[Any, Any]) -> None:
    """The generator refuses a second thread instead of corrupting its cache."""
    from llmbridge import ConcurrentEntryError

    model, tokenizer = parts
    generator = TransformersGenerator(model, tokenizer)
    inside = threading.Event()
    leave = threading.Event()

    def occupy() -> None:  # another thread, inside the generator
        with generator._guard.enter("iterate"):
            inside.set()
            leave.wait(10)

    other = threading.Thread(target=occupy)
    other.start()
    try:
        assert inside.wait(10)
        with pytest.raises(ConcurrentEntryError):
            generator.iterate()
    finally:
        leave.set()
        other.join(10)
