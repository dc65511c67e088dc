"""The in-memory cache: LRU order, TTL, JSON-only values."""

from __future__ import annotations

import pytest

from llmbridge.policies import MemoryCache

from support import Clock

pytestmark = pytest.mark.timeout(10)


def test_get_returns_a_fresh_copy() -> None:
    """Mutating what get() returned never changes the cached entry."""
    cache = MemoryCache()
    cache.set("k", {"chunks": ["a"]})
    got = cache.get("k")
    got["chunks"].append("b")
    assert cache.get("k") == {"chunks": ["a"]}


def test_least_recently_used_goes_first() -> None:
    """Beyond max_entries the entry unused for longest is evicted."""
    cache = MemoryCache(max_entries=2)
    cache.set("a", 1)
    cache.set("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.set("c", 3)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)
    assert len(cache) == 2


def test_entries_expire_after_their_ttl() -> None:
    """The default TTL and a per-entry TTL both expire entries."""
    clock = Clock()
    cache = MemoryCache(ttl=10, clock=clock)
    cache.set("default", "x")
    cache.set("short", "y", ttl=1)
    clock.now = 1.5
    assert cache.get("short") is None
    assert cache.get("default") == "x"
    clock.now = 10.5
    assert cache.get("default") is None


def test_no_ttl_keeps_entries() -> None:
    """ttl=None means entries only leave by LRU eviction."""
    clock = Clock()
    cache = MemoryCache(ttl=None, clock=clock)
    cache.set("k", True)
    clock.now = 1e9
    assert cache.get("k") is True


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"text": object()}, r"value\.text is a object"),
        ([1, 2, {3}], r"value\[2\] is a set"),
        ({"x": float("nan")}, r"value\.x is nan"),
        ({1: "a"}, "non-str key 1"),
        (b"bytes", "value is a bytes"),
    ],
)
def test_non_json_values_are_refused_with_the_path(value: object, where: str) -> None:
    """A value that is not plain JSON raises TypeError naming where, and stores nothing."""
    cache = MemoryCache()
    with pytest.raises(TypeError, match=where):
        cache.set("k", value)
    assert cache.get("k") is None


@pytest.mark.parametrize(
    "kwargs",
    [{"max_entries": 0}, {"max_entries": -1}, {"max_entries": 1.5}, {"ttl": 0}, {"ttl": -5}],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, object]) -> None:
    """Non-positive sizes and TTLs raise ValueError with the parameter's name."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MemoryCache(**kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_async_twins() -> None:
    """aget/aset behave like get/set."""
    cache = MemoryCache()
    await cache.aset("k", {"a": [1, "two", None]})
    assert await cache.aget("k") == {"a": [1, "two", None]}
    assert await cache.aget("missing") is None
