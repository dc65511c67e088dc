"""The worker's side: an :class:`~llmbridge.Engine` whose backend is the engine process.

:class:`EngineClient` is an ordinary engine (so its streams read from threads and
coroutines, cancel, time out and fail exactly like a local engine's) over
:class:`HostBackend`, which forwards each request over the Unix socket with one pooled
``httpx.AsyncClient`` on the engine loop (``httpx.AsyncHTTPTransport(uds=...)``).
Cancelling a stream cancels its task, which closes the response: the engine process sees
the disconnect and drops the job before its next step.
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
from .._exceptions import BadRequest, EngineClosed
from .._sansio.sse import SSEDecoder
from .wire import STATS_PATH, SUBMIT_PATH, error_from_problem

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
    """Forwards requests to an engine process on the Unix socket ``socket_path``.

    Runs on the client engine's loop (an :class:`~llmbridge._core.drivers.AsyncBackend`).
    Every chunk the engine process sends becomes a chunk of the local stream; its final
    ``event: done`` finishes it with the engine's usage; an error arrives as the same
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
        _require_httpx()
        self.socket_path = os.fspath(socket_path)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"HostBackend({self.socket_path!r})"

    def serve(self, jobs: JobQueue) -> None:
        """Run requests on the engine thread's loop until the engine closes."""
        serve_async(self, jobs, max_concurrency=self.max_concurrency)

    async def aopen(self) -> None:
        """Create the pooled client on the engine loop (called by the engine)."""
        self._client = httpx.AsyncClient(
            base_url="http://engine",
            transport=httpx.AsyncHTTPTransport(uds=self.socket_path),
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        """Close the pooled client (called by the engine as it stops)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def generate(self, request: Request, job: Job) -> None:
        """Run one request in the engine process, writing its text to ``job``."""
        client = self._client
        if client is None:
            raise unavailable("the client is not open")
        body = {"prompt": request.prompt, "request_id": request.id, "params": request.params}
        try:
            content = json.dumps(body).encode()
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"params must be JSON to reach the engine process: {exc}") from exc
        try:
            # Leaving this block for any reason (the end, an error, this task's
            # cancellation when the consumer goes) closes the response, which the
            # engine process sees as a disconnect: it cancels the job there.
            async with client.stream(
                "POST", SUBMIT_PATH, content=content, headers={"content-type": "application/json"}
            ) as response:
                if response.status_code >= 400:
                    raise error_from_problem(await response.aread(), response.status_code)
                await self._read(response, job)
        except httpx.HTTPError as exc:
            raise unavailable(type(exc).__name__) from exc

    @staticmethod
    async def _read(response: httpx.Response, job: Job) -> None:
        decoder = SSEDecoder()
        async for piece in response.aiter_bytes():
            for event in decoder.feed(piece):
                if event.event == "done":
                    usage = event.json().get("usage") or {}
                    job.finish(
                        str(event.json().get("finish_reason") or "stop"),
                        prompt_tokens=usage.get("prompt_tokens"),
                        completion_tokens=usage.get("completion_tokens"),
                    )
                    return
                if event.event == "error":
                    raise error_from_problem(event.data)
                text = event.json().get("text")
                if isinstance(text, str) and text and not await job.aemit(text):
                    return  # the consumer left: closing the response tells the engine
        raise unavailable("the stream ended before its last event")


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
