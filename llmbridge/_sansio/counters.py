"""A set of integer counters with a plain-dict view: no I/O, no locks."""

from __future__ import annotations

__all__ = ["Counters"]


class Counters:
    """Integer counters named by a subclass's ``__slots__``, each starting at 0.

    Written by one owner (a thread or a loop), read from anywhere: values may lag.
    """

    __slots__: tuple[str, ...] = ()

    def __init__(self) -> None:
        for name in type(self).__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict, in ``__slots__`` order."""
        return {name: getattr(self, name) for name in type(self).__slots__}
