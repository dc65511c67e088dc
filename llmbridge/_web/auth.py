"""Who is calling: API keys from code, an environment variable or a file, and principals.

:class:`ApiKeys` checks ``Authorization: Bearer <key>`` in constant time
(:class:`~llmbridge._sansio.keys.KeyTable`) and answers a :class:`Principal`: the key's
id (a short hash, safe to log), its name and its :class:`KeyLimits`. A key file is
re-read when it changes, so a revoked key stops working on the next request, without a
restart. An app with its own auth passes a hook ``authenticate(request) -> principal |
None`` instead. The key itself never leaves this module: not in a ``repr``, a log line,
an exception or a metric.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._policies.budget import KeyLimits, Quotas
from .._sansio.keys import KeyEntry, KeyTable, bearer_token, key_id, parse_keys

__all__ = [
    "PRINCIPAL_ENVIRON_KEY",
    "ApiKeys",
    "Authenticate",
    "KeyLimits",
    "Principal",
    "as_principal",
    "is_loopback",
    "key_id",
]

logger = logging.getLogger("llmbridge.openai")

#: Where the bridges put the caller's principal id for whatever logs the request: the
#: WSGI environ (Flask) or the ASGI scope (Quart) under this key; the whole
#: :class:`Principal` is ``g.llmbridge_principal``.
PRINCIPAL_ENVIRON_KEY = "llmbridge.principal"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: ``id`` (for a key, its :func:`key_id`; safe to log and
    to key limits and caches on), an optional ``name``, and its own ``limits``
    (``None``: only the pipeline's). Frozen, so shareable between threads."""

    id: str
    name: str | None = None
    limits: KeyLimits | None = field(default=None)


#: A user hook: the framework's request in, a :class:`Principal` (or its id as a str)
#: out, ``None`` to refuse. Under Quart it may be ``async``.
Authenticate = Callable[[Any], Any]


def as_principal(value: object) -> Principal | None:
    """A hook's answer as a :class:`Principal`: ``None`` and ``False`` refuse, a str is
    an id. Raises ``TypeError`` for anything else."""
    if value is None or value is False:
        return None
    if isinstance(value, Principal):
        return value
    if isinstance(value, str) and value:
        return Principal(value)
    raise TypeError(
        f"an authenticate hook returns a Principal, a str id or None, not {type(value).__name__}"
    )


class ApiKeys:
    """The keys that may call: from code (``ApiKeys(["sk-..."])`` or ``{key: KeyLimits}``),
    from an environment variable (:meth:`from_env`) or from a file (:meth:`from_file`).

    ``limits`` are every key's default :class:`KeyLimits`; a key line's ``rpm=``,
    ``tpm=``, ``tokens_per_day=`` override them and ``name=`` labels the key. ``storage``
    is where the limits count (``"memory://"`` or a ``redis://`` URL shared by every
    worker and host). :meth:`authenticate` is the blueprint's check. Thread-safe; a
    file's keys are re-read when the file changes (see :meth:`from_file`). Raises
    ``ValueError`` for a malformed key line (naming the line number, never its text)
    and for an empty key list from code or the environment.
    """

    def __init__(
        self,
        keys: Iterable[str | KeyEntry] | Mapping[str, KeyLimits | None] | str,
        *,
        limits: KeyLimits | None = None,
        storage: str = "memory://",
    ) -> None:
        self._setup(limits, storage, None, 1.0)
        entries = _entries(keys)
        if not entries:
            raise ValueError("ApiKeys needs at least one key (or auth=None to serve openly)")
        self._table: KeyTable[Principal] = self._build(entries)

    def _setup(
        self, limits: KeyLimits | None, storage: str, path: Path | None, reload_interval: float
    ) -> None:
        if limits is not None and not isinstance(limits, KeyLimits):
            raise TypeError(f"limits must be KeyLimits, got {type(limits).__name__}")
        if not reload_interval >= 0:
            raise ValueError(f"reload_interval must be >= 0, got {reload_interval!r}")
        self.limits = limits
        self.quotas = Quotas(storage=storage)
        #: Seconds between two looks at the key file (a ``stat``); 0: every lookup.
        self.reload_interval = reload_interval
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._table = KeyTable(())

    @classmethod
    def from_env(
        cls,
        name: str = "LLMBRIDGE_API_KEYS",
        *,
        limits: KeyLimits | None = None,
        storage: str = "memory://",
    ) -> ApiKeys:
        """The keys in environment variable ``name``: separated by commas or newlines,
        each optionally followed by options as in a key file. Read once. Raises
        ``ValueError`` when the variable is unset or holds no key."""
        entries = parse_keys(os.environ.get(name) or "", source=name)
        if not entries:
            raise ValueError(f"environment variable {name} holds no API key")
        return cls(entries, limits=limits, storage=storage)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        limits: KeyLimits | None = None,
        storage: str = "memory://",
        reload_interval: float = 1.0,
    ) -> ApiKeys:
        """The keys in the file at ``path``: one per line, ``#`` comments, each key
        optionally followed by ``name=``, ``rpm=``, ``tpm=``, ``tokens_per_day=``. The
        file is read now (``OSError`` if it can't be) and again when it has changed,
        looked at (``stat``) at most once per ``reload_interval`` seconds; an empty file
        admits nobody. A change that can't be read or parsed keeps the keys read last
        and logs a warning."""
        self = cls.__new__(cls)
        self._setup(limits, storage, Path(path), reload_interval)
        self._reload(force=True)
        return self

    def __repr__(self) -> str:
        where = f"file {str(self._path)!r}" if self._path is not None else "code"
        return f"ApiKeys(<{len(self._table)} keys from {where}>)"

    def __len__(self) -> int:
        self._maybe_reload()
        return len(self._table)

    def _build(self, entries: list[KeyEntry]) -> KeyTable[Principal]:
        rows = []
        for number, entry in enumerate(entries, 1):
            try:
                limits = KeyLimits.from_options(entry.options, self.limits)
            except ValueError as exc:
                raise ValueError(f"key {number}: {exc}") from None
            rows.append((entry.key, Principal(entry.id, entry.options.get("name"), limits)))
        return KeyTable(rows)

    def _reload(self, *, force: bool = False) -> None:
        assert self._path is not None
        stat = self._path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if not force and stamp == self._stamp:
            return
        table = self._build(parse_keys(self._path.read_text(), source=str(self._path)))
        self._table, self._stamp = table, stamp
        if not force:
            logger.info("API keys reloaded from %s: %d keys", self._path, len(table))

    def _maybe_reload(self) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if now - self._checked < self.reload_interval:
            return
        with self._lock:
            if now - self._checked < self.reload_interval:
                return
            self._checked = now
            try:
                self._reload()
            except (OSError, ValueError) as exc:
                # Keep serving the keys read last: a half-written file must not lock
                # everybody out, nor let everybody in.
                logger.warning("API key file %s not reloaded: %s", self._path, _safe(exc))

    def lookup(self, key: str) -> Principal | None:
        """The principal of ``key``, or ``None``. Constant time in the key (see
        :class:`~llmbridge._sansio.keys.KeyTable`). Never raises."""
        self._maybe_reload()
        return self._table.lookup(key)

    def authenticate(self, request: Any) -> Principal | None:
        """The principal of ``request``'s ``Authorization: Bearer`` key (any object with
        ``headers.get``: a Flask or Quart request), or ``None``. Never blocks beyond a
        ``stat`` of the key file."""
        token = bearer_token(request.headers.get("Authorization"))
        return None if token is None else self.lookup(token)


def _entries(
    keys: Iterable[str | KeyEntry] | Mapping[str, KeyLimits | None] | str,
) -> list[KeyEntry]:
    if isinstance(keys, str):
        return parse_keys(keys)
    if isinstance(keys, Mapping):
        entries = []
        for key, limits in keys.items():
            options = {}
            if limits is not None:
                options = {
                    o: "none" if v is None else str(v)
                    for o, v in (
                        ("rpm", limits.requests_per_minute),
                        ("tpm", limits.tokens_per_minute),
                        ("tokens_per_day", limits.tokens_per_day),
                    )
                }
            entries.append(KeyEntry(_one_key(key), options))
        return entries
    out: list[KeyEntry] = []
    for key in keys:
        out.append(key if isinstance(key, KeyEntry) else KeyEntry(_one_key(key)))
    return out


def _one_key(key: object) -> str:
    if not isinstance(key, str) or not key or any(c.isspace() for c in key):
        raise ValueError("an API key is a non-empty str without whitespace")
    return key


def _safe(exc: BaseException) -> str:
    # OSError names the path, ValueError from parse_keys the line number: no key text.
    return f"{type(exc).__name__}: {exc}"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a server's bound address) is only reachable from this machine:
    ``127.0.0.0/8``, ``::1``, ``localhost``, or a Unix socket (``None`` or a path)."""
    if not host or host.startswith("/") or host.startswith("unix:"):
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
