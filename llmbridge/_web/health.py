"""Liveness and readiness probes for the bridges: ``GET /livez`` and ``GET /readyz``.

The names are Kubernetes' own (its API server answers ``/livez`` and ``/readyz``): the
``z`` keeps them clear of an app's ``/health`` or ``/ready`` routes, and operators know
them. They are for the kubelet and the load balancer's health checks, not for clients:
keep them off the public ingress (``health_prefix`` binds them under a path of their
own, which is easy to leave out of it).

- **Live** answers from the engine thread's heartbeat. Each probe pings the engine
  thread (:meth:`~llmbridge.Engine.ping`); an engine thread takes its commands between
  two steps, so a ping (or a submit) left waiting longer than ``stuck_after`` seconds
  means a step is stuck. An engine whose thread died (its backend's serving loop raised,
  or returned while the engine was running) is not live either. An engine that has not
  started yet is live: nothing has gone wrong. Restarting the process is the cure for
  "not live", so nothing else counts here.
- **Ready** means "send me traffic": live, the engine started (the probe starts it in
  this process if nothing did yet: a WSGI server starts no engine of its own) and, with
  ``warmup``, one warm-up request done; not draining (the Quart bridge's drain, an engine
  closing); no circuit breaker of a :class:`~llmbridge.policies.Pipeline` open (half-open
  is ready: its probe calls need traffic to close it).

200 answers are ``application/json``; 503 ones are ``application/problem+json`` whose
``reasons`` say why. Both carry ``checks``, one entry per engine and breaker. Probes
never block: they read state, and at most start an engine or submit the warm-up.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .._core.engine import Engine
from .._core.stream import Stream

__all__ = [
    "HEALTH_SETTINGS",
    "Health",
    "check_health_settings",
    "health_paths",
    "health_response",
]

#: The bridges' health options: name -> (config key, default).
HEALTH_SETTINGS: dict[str, tuple[str, Any]] = {
    "health": ("LLMBRIDGE_HEALTH", True),
    "health_prefix": ("LLMBRIDGE_HEALTH_PREFIX", ""),
    "liveness_path": ("LLMBRIDGE_LIVENESS_PATH", "/livez"),
    "readiness_path": ("LLMBRIDGE_READINESS_PATH", "/readyz"),
    "stuck_after": ("LLMBRIDGE_STUCK_AFTER", 30.0),
    "warmup": ("LLMBRIDGE_WARMUP", None),
}

_JSON = "application/json"
_PROBLEM = "application/problem+json"


def check_health_settings(settings: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for a bad health option in ``settings`` (names not given are
    skipped). Pure."""
    if "health" in settings and not isinstance(settings["health"], bool):
        raise ValueError(f"health must be True or False, got {settings['health']!r}")
    prefix = settings.get("health_prefix", "")
    if not isinstance(prefix, str) or (prefix and (prefix[0] != "/" or prefix.endswith("/"))):
        raise ValueError(f"health_prefix must be '' or like '/internal', got {prefix!r}")
    for name in ("liveness_path", "readiness_path"):
        path = settings.get(name, "/-")
        if not isinstance(path, str) or not path.startswith("/") or len(path) < 2:
            raise ValueError(f"{name} must be a path like '/livez', got {path!r}")
    stuck = settings.get("stuck_after", 1.0)
    if isinstance(stuck, bool) or not isinstance(stuck, int | float) or not 0 < stuck < math.inf:
        raise ValueError(f"stuck_after must be a number of seconds > 0, got {stuck!r}")
    warmup = settings.get("warmup")
    if warmup is not None and not isinstance(warmup, str):
        raise ValueError(f"warmup must be a prompt (str) or None, got {warmup!r}")


def health_paths(settings: Mapping[str, Any]) -> tuple[str, str]:
    """The liveness and readiness paths ``settings`` ask for (prefix included)."""
    prefix = settings["health_prefix"]
    return prefix + settings["liveness_path"], prefix + settings["readiness_path"]


def _chain(submitter: Any) -> list[Any]:
    """``submitter`` and what it wraps, following ``.engine`` (a pipeline's engine, a
    pipeline wrapping another), down to the engine."""
    chain: list[Any] = []
    obj = submitter
    while obj is not None and all(obj is not seen for seen in chain) and len(chain) < 8:
        chain.append(obj)
        obj = None if isinstance(obj, Engine) else getattr(obj, "engine", None)
    return chain


def _breakers(chain: list[Any]) -> list[tuple[str, Any]]:
    """The circuit breakers of the pipelines in ``chain``, named for the checks."""
    found: list[tuple[str, Any]] = []
    for obj in chain:
        breaker = getattr(obj, "breaker", None)
        if breaker is not None and isinstance(getattr(breaker, "state", None), str):
            found.append((f"breaker{len(found) or ''}", breaker))
    return found


class Health:
    """The probes of one app: what its engines and policies say about it.

    ``submitter`` is the app's engine (or a pipeline over one), ``draining`` says whether
    the app stopped admitting. Thread-safe; never blocks.
    """

    def __init__(
        self,
        submitter: Any,
        *,
        stuck_after: float = 30.0,
        warmup: str | None = None,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.submitter = submitter
        self.stuck_after = stuck_after
        self.warmup = warmup
        self._draining = draining
        self._lock = threading.Lock()
        # Per engine: the warm-up stream in flight, or True once one finished.
        self._warm: dict[int, Stream | bool] = {}

    def engines(self) -> list[Engine]:
        """The engines behind the submitter (only :class:`~llmbridge.Engine` s have a
        heartbeat to read)."""
        return [obj for obj in _chain(self.submitter) if isinstance(obj, Engine)]

    def live(self) -> tuple[int, dict[str, Any]]:
        """Status and body of the liveness probe."""
        checks: dict[str, Any] = {}
        reasons: list[str] = []
        for engine in self.engines():
            checks[engine.name] = self._engine_liveness(engine, reasons)
        return _answer("Not live", checks, reasons)

    def ready(self) -> tuple[int, dict[str, Any]]:
        """Status and body of the readiness probe; starts an engine that has not started,
        and submits the warm-up request once."""
        checks: dict[str, Any] = {}
        reasons: list[str] = []
        draining = self._draining()
        for engine in self.engines():
            if engine.closed:
                draining = True
                checks[engine.name] = "closed"
                continue
            if not engine.running and engine.crashed is None:
                engine.start()  # a WSGI server starts nothing: the first probe does
            state = self._engine_liveness(engine, reasons)
            if state == "running" and self.warmup is not None:
                state = self._warmup_state(engine, reasons)
            checks[engine.name] = state
        checks["draining"] = draining
        if draining:
            reasons.append("the server is draining: it takes no new requests")
        for name, breaker in _breakers(_chain(self.submitter)):
            state = breaker.state
            checks[name] = state
            if state == "open":
                reasons.append("the circuit breaker is open: the backend is failing")
        return _answer("Not ready", checks, reasons)

    def _engine_liveness(self, engine: Engine, reasons: list[str]) -> str:
        if engine.crashed is not None:
            reasons.append(f"engine {engine.name}: its thread died")
            return "crashed"
        if not engine.running:
            return "not started"
        thread = engine.thread
        if thread is None or not thread.is_alive():
            reasons.append(f"engine {engine.name}: its thread died")
            return "dead"
        stalled = engine.stalled_for
        engine.ping()
        if stalled > self.stuck_after:
            reasons.append(
                f"engine {engine.name}: one step has run for {stalled:.1f} s "
                f"(stuck_after is {self.stuck_after:g} s)"
            )
            return "stuck"
        return "running"

    def _warmup_state(self, engine: Engine, reasons: list[str]) -> str:
        with self._lock:
            warm = self._warm.get(id(engine))
            if warm is True:
                return "running"
            if isinstance(warm, Stream) and warm.channel.ended:
                try:
                    warm.channel.completion()
                except Exception:
                    warm = None  # failed: try again at the next probe
                else:
                    self._warm[id(engine)] = True
                    return "running"
            if not isinstance(warm, Stream):
                assert self.warmup is not None
                try:
                    self._warm[id(engine)] = engine.submit(self.warmup, max_new_tokens=1)
                except Exception:
                    reasons.append(f"engine {engine.name}: the warm-up request was refused")
                    return "warming up"
        reasons.append(f"engine {engine.name}: warming up")
        return "warming up"


def _answer(title: str, checks: dict[str, Any], reasons: list[str]) -> tuple[int, dict[str, Any]]:
    if not reasons:
        return 200, {"status": "ok", "checks": checks}
    return 503, {
        "type": "about:blank",
        "title": title,
        "status": 503,
        "detail": "; ".join(reasons),
        "reasons": reasons,
        "checks": checks,
    }


def health_response(status: int, body: dict[str, Any]) -> tuple[bytes, int, dict[str, str]]:
    """Bytes, status and headers of a probe's answer."""
    headers = {"Content-Type": _JSON if status == 200 else _PROBLEM, "Cache-Control": "no-store"}
    return json.dumps(body).encode(), status, headers
