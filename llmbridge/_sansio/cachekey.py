"""Cache keys for requests: sans-I/O, pure functions.

A key is the SHA-256 of a canonical JSON document holding a format version, the
namespace, the prompt and every parameter. Two requests get the same key exactly when a
backend would see the same input: parameter order does not matter, ``1`` and ``1.0`` are
the same number, and a parameter set to ``None`` is the same as one left out (backends
treat ``None`` as "use the default"). The scheduling parameters (:data:`SCHEDULING`:
``priority``, ``queue_timeout``) say when a request runs, not what it produces, so they
are left out: an urgent request is served the answer a patient one stored.

Whether a request may be served from a cache at all is :func:`is_deterministic`: only a
greedy request (temperature 0, ``do_sample=False``, ``top_k=1``) or one with a fixed seed
produces the same text every time.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "KEY_VERSION",
    "SCHEDULING",
    "NotCacheable",
    "cache_key",
    "is_deterministic",
    "normalise",
]

#: Bumped whenever the normal form changes, so old entries are never misread.
KEY_VERSION = 2

#: Parameters that schedule a request without changing its output: not in the key.
SCHEDULING = frozenset({"priority", "queue_timeout"})


class NotCacheable(ValueError):
    """A request holds a value with no canonical JSON form (an object, a NaN, ...)."""


def _normal(value: Any, path: str) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotCacheable(f"{path} is {value!r}, which has no JSON form")
        # 1.0 and 1 must hash alike: backends treat them alike.
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotCacheable(f"{path} has a non-str key {key!r}")
            if item is None:
                continue
            out[key] = _normal(item, f"{path}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_normal(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise NotCacheable(f"{path} is a {type(value).__name__}, which has no JSON form")


def normalise(prompt: str, params: Mapping[str, Any], *, namespace: str = "") -> str:
    """The canonical JSON text of a request: what :func:`cache_key` hashes.

    Raises :class:`NotCacheable` if a parameter has no canonical JSON form.
    """
    document = {
        "v": KEY_VERSION,
        "ns": namespace,
        "prompt": prompt,
        "params": _normal({k: v for k, v in params.items() if k not in SCHEDULING}, "params"),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(prompt: str, params: Mapping[str, Any], *, namespace: str = "") -> str:
    """The SHA-256 hex digest of the normalised request plus ``namespace``.

    ``prompt`` may be a plain prompt; chat messages, the model name and sampling
    parameters belong in ``params``. Pure and thread-safe. Raises :class:`NotCacheable`
    if a parameter has no canonical JSON form.

    >>> cache_key("hi", {"temperature": 0, "model": "m"}) == cache_key(
    ...     "hi", {"model": "m", "temperature": 0.0, "seed": None})
    True
    """
    text = normalise(prompt, params, namespace=namespace)
    return hashlib.sha256(text.encode()).hexdigest()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def is_deterministic(params: Mapping[str, Any]) -> bool:
    """True if the request asks for the same output every time.

    That is: ``temperature`` is 0, ``do_sample`` is False, ``top_k`` is 1 (greedy
    decoding), or an integer ``seed`` is fixed. A request that leaves sampling to the
    backend's defaults is *not* deterministic (most default to temperature 1).
    """
    if _number(params.get("temperature")) == 0.0:
        return True
    if params.get("do_sample") is False:
        return True
    if _number(params.get("top_k")) == 1.0:
        return True
    seed = params.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)
