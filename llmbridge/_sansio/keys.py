"""API keys without I/O: the Bearer header, key ids, key lists and a constant-time lookup.

Nothing here reads a file or the environment (that is :mod:`llmbridge._web.auth`), and
nothing here ever puts a key into an exception message or a ``repr``: errors name the
line number, never the line.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["KeyEntry", "KeyTable", "bearer_token", "key_id", "parse_keys"]

T = TypeVar("T")

#: Option names a key line may carry after the key (``sk-abc rpm=60 name=alice``).
KEY_OPTIONS = ("name", "rpm", "tpm", "tokens_per_day")


def key_id(key: str) -> str:
    """A short stable id for ``key``: ``"key-"`` and 16 hex digits of its SHA-256.

    Safe to log, to put in metrics and in Redis keys; the same key has the same id in
    every process and host. It identifies a key, it does not protect a weak one: use
    long random keys (``secrets.token_urlsafe(32)``).
    """
    return "key-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive,
    as RFC 9110 says), or ``None`` for a missing header, another scheme or no token."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One configured key and the options on its line. ``repr`` hides the key."""

    key: str = field(repr=False)
    options: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The key's :func:`key_id`."""
        return key_id(self.key)


def parse_keys(text: str, *, source: str = "keys") -> list[KeyEntry]:
    """The keys in ``text``: one per line (or separated by commas), each optionally
    followed by ``name=value`` options (see :data:`KEY_OPTIONS`); blank lines and
    ``#`` comments are skipped. A key may not contain whitespace, ``,`` or start
    with ``#``.

    Raises ``ValueError`` naming ``source`` and the line number (never its text) for an
    unknown or malformed option.
    """
    entries: list[KeyEntry] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0] if line.lstrip().startswith("#") else _strip_comment(line)
        for part in line.split(","):
            words = part.split()
            if not words:
                continue
            options: dict[str, str] = {}
            for word in words[1:]:
                name, eq, value = word.partition("=")
                if not eq or name not in KEY_OPTIONS or not value:
                    raise ValueError(
                        f"{source}, line {number}: options after a key are "
                        f"name=value with a name among {', '.join(KEY_OPTIONS)}"
                    )
                options[name] = value
            entries.append(KeyEntry(words[0], options))
    return entries


def _strip_comment(line: str) -> str:
    # A comment starts at " #": a "#" inside a key is part of the key.
    cut = line.find(" #")
    return line if cut < 0 else line[:cut]


class KeyTable(Generic[T]):
    """Presented keys to values, looked up in time that depends on neither the configured
    keys' lengths nor on how much of a key the presented one shares.

    Each key is stored as its SHA-256 digest; a lookup hashes the presented key once and
    compares that 32-byte digest with *every* stored digest by ``hmac.compare_digest``,
    without stopping at a match. What the time can still tell is only the number of
    configured keys and the presented key's own length. Immutable, so thread-safe.
    """

    __slots__ = ("_rows",)

    def __init__(self, items: Iterable[tuple[str, T]]) -> None:
        self._rows = tuple((_digest(key), value) for key, value in items)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"KeyTable(<{len(self._rows)} keys>)"

    def lookup(self, presented: str) -> T | None:
        """The value of ``presented``'s key, or ``None``. Never raises."""
        digest = _digest(presented)
        found: T | None = None
        for stored, value in self._rows:
            if hmac.compare_digest(stored, digest):
                found = value
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
