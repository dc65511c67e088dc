"""Cache keys: one key per backend-visible request, and the determinism rule."""

from __future__ import annotations

import math

import pytest

from llmbridge._sansio.cachekey import NotCacheable, cache_key, is_deterministic, normalise

pytestmark = pytest.mark.timeout(10)


def test_key_is_sha256_hex() -> None:
    """A key is 64 hex digits."""
    key = cache_key("hello", {"temperature": 0})
    assert len(key) == 64
    int(key, 16)


def test_parameter_order_numbers_and_nones_do_not_matter() -> None:
    """Reordered params, 0 vs 0.0 and an explicit None give the same key."""
    a = cache_key("p", {"model": "m", "temperature": 0, "max_tokens": 8})
    b = cache_key("p", {"max_tokens": 8.0, "temperature": 0.0, "model": "m", "seed": None})
    assert a == b


def test_every_input_changes_the_key() -> None:
    """Prompt, each parameter, message content and the namespace all enter the key."""
    base = cache_key("p", {"temperature": 0, "messages": [{"role": "user", "content": "x"}]})
    variants = [
        cache_key("q", {"temperature": 0, "messages": [{"role": "user", "content": "x"}]}),
        cache_key("p", {"temperature": 0.5, "messages": [{"role": "user", "content": "x"}]}),
        cache_key("p", {"temperature": 0, "messages": [{"role": "user", "content": "y"}]}),
        cache_key("p", {"temperature": 0, "messages": [{"role": "user", "content": "x"}], "n": 1}),
        cache_key(
            "p",
            {"temperature": 0, "messages": [{"role": "user", "content": "x"}]},
            namespace="tenant-a",
        ),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_prompt_is_not_confused_with_params() -> None:
    """Moving text between the prompt and a parameter changes the key (no ambiguity)."""
    assert cache_key("ab", {"x": "c"}) != cache_key("a", {"x": "bc"})


def test_normal_form_is_canonical_json() -> None:
    """The hashed text is compact, key-sorted JSON with a version."""
    text = normalise("p", {"b": 1, "a": [1.0, True]}, namespace="n")
    assert text == '{"ns":"n","params":{"a":[1,true],"b":1},"prompt":"p","v":2}'


@pytest.mark.parametrize("bad", [object(), math.nan, math.inf, {1: "int key"}, {1, 2}])
def test_values_without_json_form_are_not_cacheable(bad: object) -> None:
    """Objects, NaN/inf, non-str keys and sets raise NotCacheable naming the path."""
    with pytest.raises(NotCacheable, match=r"params\.stop"):
        cache_key("p", {"stop": bad})


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "top_p": 0.9}, True),
        ({"seed": 7, "temperature": 1.0}, True),
        ({"do_sample": False}, True),
        ({"top_k": 1}, True),
        ({}, False),
        ({"temperature": 0.7}, False),
        ({"seed": None}, False),
        ({"seed": True}, False),
        ({"temperature": "0"}, False),
    ],
)
def test_determinism_rule(params: dict[str, object], expected: bool) -> None:
    """Only greedy decoding or a fixed integer seed counts as deterministic."""
    assert is_deterministic(params) is expected


def test_scheduling_parameters_are_not_part_of_the_key() -> None:
    """``priority`` and ``queue_timeout`` change when a request runs, not its text."""
    base = cache_key("p", {"temperature": 0})
    assert cache_key("p", {"temperature": 0, "priority": 3}) == base
    assert cache_key("p", {"temperature": 0, "queue_timeout": 2.5, "priority": 1}) == base
    assert cache_key("p", {"temperature": 0, "seed": 1}) != base


def test_an_urgent_request_is_served_what_a_patient_one_stored() -> None:
    from llmbridge import Engine
    from llmbridge.policies import MemoryCache, Pipeline

    calls: list[str] = []

    def answer(prompt: str, **params: object) -> str:
        calls.append(prompt)
        return prompt.upper()

    with Pipeline(Engine(answer), cache=MemoryCache(max_entries=8)) as pipeline:
        first = pipeline.submit("hello", temperature=0, priority=0).result(10).text
        second = pipeline.submit("hello", temperature=0, priority=1).result(10).text
    assert first == second == "HELLO"
    assert calls == ["hello"]
