"""Option checks shared by the bridges: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["check_bridge_options"]


#: Options given in seconds: each must be a number > 0, or None for "no limit".
_SECONDS_OPTIONS = ("heartbeat", "start_timeout", "timeout", "offload_timeout")


def check_bridge_options(owner: str, options: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    """Refuse unknown option names and non-positive durations with a clear message."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(
            f"unknown {owner} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    for name in _SECONDS_OPTIONS:
        value = options.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
        ):
            raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")
