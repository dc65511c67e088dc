"""locked(): serialising calls into an object that is not thread-safe."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from llmbridge import locked

pytestmark = pytest.mark.timeout(30)


class Fragile:
    """Detects two threads inside at once, like a llama_cpp.Llama would corrupt."""

    def __init__(self) -> None:
        self.inside = 0
        self.overlaps = 0
        self.name = "fragile"

    def _enter(self) -> None:
        self.inside += 1
        if self.inside > 1:
            self.overlaps += 1

    def complete(self, prompt: str) -> str:
        self._enter()
        time.sleep(0.001)
        self.inside -= 1
        return prompt.upper()

    def stream(self, prompt: str) -> Iterator[str]:
        self._enter()
        try:
            for ch in prompt:
                time.sleep(0.0005)
                yield ch
        finally:
            self.inside -= 1


def hammer(fn: object, n_threads: int = 8) -> None:
    threads = [threading.Thread(target=fn) for _ in range(n_threads)]  # type: ignore[arg-type]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)


def test_unlocked_object_sees_overlapping_calls() -> None:
    """The control: without locked(), threads overlap inside the object."""
    obj = Fragile()
    hammer(lambda: [obj.complete("x") for _ in range(20)])
    assert obj.overlaps > 0


def test_locked_calls_never_overlap() -> None:
    """Through locked(), calls take turns."""
    obj = Fragile()
    proxy = locked(obj)
    hammer(lambda: [proxy.complete("x") for _ in range(20)])
    assert obj.overlaps == 0
    assert proxy.complete("abc") == "ABC"


def test_a_returned_generator_holds_the_lock_until_exhausted() -> None:
    """Streaming calls keep the lock for the whole stream, so streams never interleave."""
    obj = Fragile()
    proxy = locked(obj)
    outputs: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        text = "".join(proxy.stream("abcdef"))
        with lock:
            outputs.append(text)

    hammer(run)
    assert obj.overlaps == 0
    assert outputs == ["abcdef"] * 8
    assert not proxy.lock.locked()


def test_closing_a_generator_early_releases_the_lock() -> None:
    """Abandoning a stream after one chunk frees the object for the next caller."""
    proxy = locked(Fragile())
    gen = proxy.stream("abc")
    assert next(gen) == "a"
    assert proxy.lock.locked()
    gen.close()
    assert not proxy.lock.locked()
    assert proxy.complete("x") == "X"


def test_exception_releases_the_lock() -> None:
    """A call that raises does not leave the lock held."""

    class Boom:
        def go(self) -> None:
            raise RuntimeError("boom")

    proxy = locked(Boom())
    with pytest.raises(RuntimeError):
        proxy.go()
    assert not proxy.lock.locked()


def test_with_block_holds_the_lock_across_calls() -> None:
    """`with proxy as obj:` gives the raw object under the lock for several calls."""
    obj = Fragile()
    proxy = locked(obj)
    with proxy as raw:
        assert raw is obj
        assert proxy.lock.locked()
    assert not proxy.lock.locked()


def test_attributes_and_callables() -> None:
    """Plain attributes read through; calling a locked function works; repr names it."""
    proxy = locked(Fragile())
    assert proxy.name == "fragile"
    proxy.name = "renamed"
    assert proxy.wrapped.name == "renamed"
    double = locked(lambda x: x * 2)
    assert double(4) == 8
    assert "locked(" in repr(proxy)
