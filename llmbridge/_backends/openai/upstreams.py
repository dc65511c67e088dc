"""Several upstreams behind one backend: least-outstanding balancing, a breaker per
upstream, cooldowns and per-upstream counters, without I/O.

Everything here runs on the engine's event loop (the one thread that calls
:meth:`Balancer.pick`, :meth:`UpstreamState.begin` and :meth:`UpstreamState.end`);
the counters are plain ints that any thread may read (values may lag).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Balancer", "Upstream", "UpstreamState"]


@dataclass(frozen=True)
class Upstream:
    """One OpenAI-compatible server an :class:`~llmbridge.backends.OpenAIBackend` may call.

    ``url`` is its base URL (``http://host:8000/v1``), ``api_key`` its bearer token,
    ``uds`` the path of a Unix socket to reach it through instead of TCP (the URL's host
    then only names it in the ``Host`` header: ``Upstream("http://localhost/v1",
    uds="/run/llmbridge.sock")`` reaches ``llmbridge serve --socket`` or any server
    listening on a socket),
    ``models`` maps the model names callers use to this server's own (a name not in the
    map is sent as the backend's ``model``, else as the caller gave it), ``weight`` its
    share under balancing (twice the weight: twice the outstanding requests before it
    stops being the least loaded), ``name`` labels it in metrics and logs (default: the
    URL). Immutable; share it freely.

    >>> Upstream("http://10.0.0.2:8000/v1", models={"gpt-4o": "llama-3-70b"}, weight=2)
    Upstream(url='http://10.0.0.2:8000/v1', ...)

    Raises ``ValueError`` for a URL that isn't http(s) (a ``unix:`` URL included: give
    the socket as ``uds``), a ``uds`` that isn't a non-empty path, or a weight <= 0.
    """

    url: str
    api_key: str | None = None
    models: Mapping[str, str] = field(default_factory=dict)
    weight: float = 1.0
    name: str | None = None
    uds: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.url, str) and self.url.startswith(("unix:", "http+unix:")):
            raise ValueError(
                f"give a Unix socket as uds=, with an http URL for the path: "
                f"Upstream('http://localhost/v1', uds='/path/to.sock'), got {self.url!r}"
            )
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"an upstream url must be an http(s) URL, got {self.url!r}")
        if self.uds is not None:
            object.__setattr__(self, "uds", _socket_path(self.uds))
        if isinstance(self.weight, bool) or not self.weight > 0:
            raise ValueError(f"an upstream weight must be > 0, got {self.weight!r}")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        object.__setattr__(self, "models", dict(self.models))

    def __repr__(self) -> str:
        via = "" if self.uds is None else f", uds={self.uds!r}"
        return f"Upstream(url={self.url!r}{via}, ...)"

    @property
    def label(self) -> str:
        """The name in metrics: ``name``, else the URL (and the socket, with ``uds``)."""
        if self.name:
            return self.name
        return self.url if self.uds is None else f"{self.url} (unix:{self.uds})"

    def model_for(self, model: str | None, default: str | None) -> str | None:
        """The model name to send this upstream for a caller's ``model``."""
        if model is not None and model in self.models:
            return self.models[model]
        return default if default is not None else model


def _socket_path(uds: object) -> str:
    """``uds`` as a ``str`` path, or ``ValueError``."""
    try:
        path = os.fspath(uds)  # type: ignore[call-overload]  # checked just below
    except TypeError:
        path = None
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"uds must be the path of a Unix socket, got {uds!r}")
    return path


class UpstreamState:
    """One upstream's live state: outstanding requests, its breaker and its counters.

    The breaker opens after ``failures`` consecutive failures (a refused or broken
    connection, a timeout, a 429 or 5xx before the first chunk): the upstream then cools
    down for ``cooldown`` seconds, when no request is sent to it. After that, one request
    probes it (the others keep away until the probe ends): a success closes the breaker,
    a failure starts the next cooldown.
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        failures: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.failures_to_open = failures
        self.cooldown = cooldown
        self._clock = clock
        #: Its ``aiohttp.ClientSession`` while the backend is open.
        self.session: Any = None
        #: The proxy the environment names for it (read when the backend opens).
        self.proxy: str | None = None
        #: Requests sent to this upstream (attempts, failovers included).
        self.requests = 0
        #: Attempts that failed in a way that counts against the upstream.
        self.failures = 0
        #: Requests failed over from this upstream to another one.
        self.failovers = 0
        #: Requests in flight to this upstream now.
        self.outstanding = 0
        #: Times its breaker opened.
        self.cooldowns = 0
        self._consecutive = 0
        self._open_until: float | None = None
        self._probing = False

    def __repr__(self) -> str:
        return f"<UpstreamState {self.upstream.label!r} outstanding={self.outstanding}>"

    @property
    def cooling_down(self) -> bool:
        """True while the breaker is open and the cooldown has not passed."""
        until = self._open_until
        return until is not None and self._clock() < until

    @property
    def cooldown_left(self) -> float:
        """Seconds until the cooldown ends (0 when it is not cooling down)."""
        until = self._open_until
        return 0.0 if until is None else max(0.0, until - self._clock())

    def available(self) -> bool:
        """Whether a request may be sent now (closed, or a half-open breaker's probe)."""
        if self._open_until is None:
            return True
        return not self._probing and not self.cooling_down

    def begin(self) -> None:
        """A request is sent to this upstream."""
        self.requests += 1
        self.outstanding += 1
        if self._open_until is not None:
            self._probing = True  # half-open: this one request tests it

    def end(self, *, failed: bool | None) -> None:
        """A request sent here ended: ``failed`` if it counts against the upstream,
        ``False`` for an answer (a 400 included: the upstream is alive), ``None`` when
        it says nothing about the upstream (the consumer cancelled it)."""
        self.outstanding -= 1
        self._probing = False
        if failed is None:
            return
        if not failed:
            self._consecutive = 0
            self._open_until = None
            return
        self.failures += 1
        self._consecutive += 1
        if self._consecutive >= self.failures_to_open:
            self._open_until = self._clock() + self.cooldown
            self.cooldowns += 1

    def as_dict(self) -> dict[str, Any]:
        """The counters and gauges as a plain dict (for metrics)."""
        return {
            "name": self.upstream.label,
            "url": self.upstream.url,
            "requests": self.requests,
            "failures": self.failures,
            "failovers": self.failovers,
            "outstanding": self.outstanding,
            "cooling_down": self.cooling_down,
            "cooldowns": self.cooldowns,
        }


class Balancer:
    """Picks the upstream for each attempt: the available one with the fewest
    outstanding requests per unit of weight (ties: the fewest requests so far per unit
    of weight, then the order given). With one upstream the breaker never keeps it
    away: there is nothing to fail over to, so a request still tries it."""

    def __init__(self, states: Iterable[UpstreamState]) -> None:
        self.states = list(states)

    def pick(self, tried: Iterable[UpstreamState] = ()) -> UpstreamState | None:
        """The upstream for the next attempt, or ``None`` when every one not yet
        ``tried`` is cooling down (or was tried)."""
        skip = {id(s) for s in tried}
        candidates = [s for s in self.states if id(s) not in skip]
        if len(self.states) > 1:
            candidates = [s for s in candidates if s.available()]
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda s: (s.outstanding / s.upstream.weight, s.requests / s.upstream.weight),
        )

    def soonest_back(self) -> float | None:
        """Seconds until the first cooling upstream may be tried again."""
        waits = [s.cooldown_left for s in self.states if s.cooling_down]
        return min(waits) if waits else None
