"""The worker's side: an :class:`~llmbridge.Engine` whose backend is the engine process.

:class:`EngineClient` is an ordinary engine (so its streams read from threads and
coroutines, cancel, time out and fail exactly like a local engine's) over
:class:`HostBackend`, which forwards each request over the engine process's stream
socket (:mod:`.streams`: a connection per request, a JSON line per event) on the engine
loop. Cancelling a stream cancels its task, which closes the connection: the engine
process sees it and drops the job before its next step. The engine process's counters
come over its HTTP socket (``/llmbridge/v1/stats``).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from typing import Any

from .._core.channel import Request
from .._core.drivers import serve_async
from .._core.engine import Engine
from .._core.jobs import EngineStats, Job, JobQueue
from .._core.stream import Stream
from .._exceptions import BadRequest, EngineClosed, LLMBridgeError
from .streams import read_stream, stream_socket_path
from .wire import STATS_PATH

try:
    import httpx
except ImportError:  # pragma: no cover - depends on the environment
    pass

__all__ = ["EngineClient", "HostBackend", "unavailable"]

_ids = itertools.count(1)


def _require_httpx() -> None:
    if "httpx" not in globals():
        raise ImportError('a shared engine needs httpx: pip install "llmbridge[http]"')


def unavailable(why: str) -> EngineClosed:
    """The error a request gets when the engine process can't be reached or died under
    it: 503 with ``Retry-After: 1`` (a supervisor restarts the process)."""
    return EngineClosed(f"the engine process is unavailable ({why})", retry_after=1.0)


class HostBackend:
    """Forwards requests to the engine process whose socket is ``socket_path`` (over its
    stream socket, ``socket_path`` + :data:`~llmbridge._host.streams.STREAM_SUFFIX`).

    Runs on the client engine's loop (an :class:`~llmbridge._core.drivers.AsyncBackend`).
    Every chunk the engine process sends becomes a chunk of the local stream; its last
    line finishes it with the engine's usage; an error arrives as the same
    :class:`~llmbridge.LLMBridgeError` class. A connection that fails or breaks (the
    engine process crashed or is restarting) fails the request at once with
    :func:`unavailable` (503). ``connect_timeout`` bounds the connect, ``timeout`` the
    silence between two reads (the engine sends heartbeats), ``None`` for none.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        connect_timeout: float = 5.0,
        timeout: float | None = None,
        max_concurrency: int = 4096,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.stream_path = stream_socket_path(self.socket_path)

    def __repr__(self) -> str:
        return f"HostBackend({self.socket_path!r})"

    def serve(self, jobs: JobQueue) -> None:
        """Run requests on the engine thread's loop until the engine closes."""
        serve_async(self, jobs, max_concurrency=self.max_concurrency)

    async def aopen(self) -> None:
        """Nothing to open: each request connects on its own (called by the engine)."""

    async def aclose(self) -> None:
        """Nothing to close (called by the engine as it stops)."""

    async def generate(self, request: Request, job: Job) -> None:
        """Run one request in the engine process, writing its text to ``job``."""
        body = {"prompt": request.prompt, "request_id": request.id, "params": request.params}
        try:
            content = json.dumps(body).encode()
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"params must be JSON to reach the engine process: {exc}") from exc
        try:
            await read_stream(
                self.stream_path,
                content,
                job,
                connect_timeout=self.connect_timeout,
                timeout=self.timeout,
            )
        except LLMBridgeError:
            raise
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            # Refused, reset, cut short, silent past ``timeout``, or a line we can't read:
            # the engine process is gone or restarting.
            raise unavailable(type(exc).__name__) from exc


class EngineClient(Engine):
    """The engine of a worker whose model lives in the engine process at ``socket_path``.

    Use it wherever an :class:`~llmbridge.Engine` goes (``FlaskBridge(app, client)``,
    ``QuartBridge``, the OpenAI blueprints, a :class:`~llmbridge.policies.Pipeline`): its
    streams have the same semantics, and every error the engine process raises arrives
    here as the same class. Admission (``max_queued``) is the engine process's, so it
    holds host-wide; ``stats``, ``queued`` and ``in_flight`` are read from the engine
    process (a short blocking call over the socket), so metrics report the host's
    figures; ``local_stats`` are this worker's own. Thread-safe; fork-safe (a forked
    child opens its own connections).
    """

    def __init__(
        self,
        socket_path: str,
        *,
        connect_timeout: float = 5.0,
        timeout: float | None = None,
        stats_timeout: float = 2.0,
        name: str | None = None,
    ) -> None:
        _require_httpx()
        backend = HostBackend(socket_path, connect_timeout=connect_timeout, timeout=timeout)
        super().__init__(backend, max_queued=1 << 30, name=name or "llmbridge-engine-client")
        self.socket_path = backend.socket_path
        self.stats_timeout = stats_timeout
        self._sync_lock = threading.Lock()
        self._sync: tuple[int, httpx.Client] | None = None

    def __repr__(self) -> str:
        return f"<EngineClient {self.socket_path!r}>"

    def submit(self, prompt: str, /, *, request_id: str | None = None, **params: Any) -> Stream:
        """Submit to the engine process; see :meth:`Engine.submit`. Never blocks.

        Without a ``request_id`` the id is made unique on the host (it names the
        worker's pid), so it is the engine process's id too."""
        if request_id is None:
            request_id = f"w{os.getpid()}-{next(_ids)}"
        return super().submit(prompt, request_id=request_id, **params)

    def remote(self) -> dict[str, Any]:
        """The engine process's ``/llmbridge/v1/stats``. Blocks up to ``stats_timeout``.
        Raises :class:`~llmbridge.EngineClosed` when it can't be reached."""
        try:
            response = self._sync_client().get(STATS_PATH)
            response.raise_for_status()
            data: dict[str, Any] = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise unavailable(type(exc).__name__) from exc
        return data

    def _sync_client(self) -> httpx.Client:
        with self._sync_lock:
            if self._sync is None or self._sync[0] != os.getpid():
                client = httpx.Client(
                    base_url="http://engine",
                    transport=httpx.HTTPTransport(uds=self.socket_path),
                    timeout=self.stats_timeout,
                )
                self._sync = (os.getpid(), client)
            return self._sync[1]

    @property
    def stats(self) -> EngineStats:
        """The engine process's counters (all zero while it can't be reached)."""
        stats = EngineStats()
        try:
            counters = self.remote().get("stats", {})
        except EngineClosed:
            return stats
        for key, value in counters.items():
            if key in EngineStats.__slots__ and isinstance(value, int):
                setattr(stats, key, value)
        return stats

    @property
    def local_stats(self) -> EngineStats:
        """This worker's own counters (its requests to the engine process)."""
        return super().stats

    @property
    def queued(self) -> int:
        """Requests waiting in the engine process (0 while it can't be reached)."""
        try:
            return int(self.remote().get("queued", 0))
        except EngineClosed:
            return 0

    @property
    def in_flight(self) -> int:
        """Requests the engine process's backend works on (0 while it can't be reached)."""
        try:
            return int(self.remote().get("in_flight", 0))
        except EngineClosed:
            return 0

    def close(self, timeout: float | None = None) -> None:
        """Stop this client (not the engine process). Blocks like :meth:`Engine.close`."""
        super().close(timeout)
        with self._sync_lock:
            sync, self._sync = self._sync, None
        if sync is not None and sync[0] == os.getpid():
            sync[1].close()
