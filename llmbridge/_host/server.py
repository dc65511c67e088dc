"""The engine process's server: one submitter on a Unix socket, under uvicorn.

:class:`EngineApp` is a plain ASGI app (no framework: each request costs one parse and
one :class:`~llmbridge._web.body.StreamBody`). ``POST /llmbridge/v1/submit`` takes
``{"prompt", "request_id", "params"}``, waits for the first output and streams the SSE
wire of :mod:`.wire`; ``GET /llmbridge/v1/stats`` answers the engine's counters (so a
worker's metrics are the host's) and what is still open on the socket: ``requests``
(HTTP requests being served, the stats request itself left out) and ``connections``
(client connections, its own left out); ``/v1/...`` is the OpenAI surface over the same
submitter (:class:`~llmbridge._openai.routes.Routes`), for OpenAI clients.

A client that goes (its worker closed the response, or the worker died) is seen as the
ASGI ``http.disconnect``, and cancels the request in this engine before its next step.

:func:`bind_unix_socket` creates the socket with mode 0600 (or 0660 and a group) from the
start, under a umask, so no other user can connect even for an instant.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from .._core.engine import Submitter
from .._exceptions import BadRequest, LLMBridgeError
from .._sansio.framing import Reply, problem_reply
from .._web.body import StreamBody
from .._web.bridge import REQUEST_ID_HEADER, valid_request_id
from .openai import OpenAISurface
from .pump import Receive, Scope, Send, header, read_body, reply, stream_reply
from .streams import StreamServer
from .wire import HEALTH_PATH, STATS_PATH, SUBMIT_PATH, parse_submit

__all__ = ["EngineApp", "bind_unix_socket"]

logger = logging.getLogger("llmbridge.host")


class EngineApp:
    """The ASGI app the engine process serves, from one event loop (its counts are
    that loop's).

    ``submitter`` is an :class:`~llmbridge.Engine` or a
    :class:`~llmbridge.policies.Pipeline`; ``stats_of`` the engine whose counters
    ``/llmbridge/v1/stats`` answers (default: ``submitter.engine`` or ``submitter``);
    ``connections`` a callable counting the server's open client connections (the
    server knows them, not the app: :func:`~llmbridge._host.process.serve_once` passes
    uvicorn's), reported as ``connections`` (``null`` without it).
    """

    def __init__(
        self,
        submitter: Submitter,
        *,
        stats_of: Any = None,
        heartbeat: float | None = 15.0,
        streams: StreamServer | None = None,
        connections: Callable[[], int] | None = None,
    ) -> None:
        self.submitter = submitter
        self.stats_of = stats_of or getattr(submitter, "engine", submitter)
        self.heartbeat = heartbeat
        self.streams = streams
        self.connections = connections
        self._openai: Any = None
        # Only touched on the server's one event loop: no lock.
        self._requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self._requests += 1
        try:
            await self._route(scope, receive, send)
        finally:
            self._requests -= 1

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == SUBMIT_PATH and method == "POST":
            await self._submit(scope, receive, send)
        elif path == STATS_PATH and method == "GET":
            await reply(send, Reply.json(self._stats()))
        elif path == HEALTH_PATH and method == "GET":
            await reply(send, Reply.json({"status": "ok", "pid": os.getpid()}))
        elif path == "/v1" or path.startswith("/v1/"):
            await self._v1(scope, receive, send)
        else:
            error = BadRequest(f"no route {method} {path} on the engine process")
            error.status = 404
            await reply(send, problem_reply(error))

    async def _v1(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._openai is None:
            self._openai = OpenAISurface(self.submitter, heartbeat=self.heartbeat)
        await self._openai(scope, receive, send)

    def _stats(self) -> dict[str, Any]:
        engine = self.stats_of
        stats = getattr(engine, "stats", None)
        # The stats request itself is one request on one connection: left out, so
        # an idle engine process reads 0 and 0.
        connections = self.connections() - 1 if self.connections is not None else None
        return {
            "pid": os.getpid(),
            "stats": stats.as_dict() if stats is not None else {},
            "queued": int(getattr(engine, "queued", 0)),
            "in_flight": int(getattr(engine, "in_flight", 0)),
            "requests": self._requests - 1,
            "connections": connections,
            "stream_connections": self.streams.connections if self.streams is not None else 0,
        }

    async def _submit(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            prompt, request_id, params = parse_submit(await read_body(receive))
            stream = self.submitter.submit(prompt, request_id=request_id, **params)
        except LLMBridgeError as error:
            await reply(send, problem_reply(error, valid_request_id(header(scope, _ID))))
            return
        body = StreamBody(stream, heartbeat=self.heartbeat)
        await stream_reply(
            receive, send, stream, body, {"Cache-Control": "no-cache", REQUEST_ID_HEADER: stream.id}
        )


_ID = REQUEST_ID_HEADER.lower().encode()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def bind_unix_socket(path: str, *, group: str | int | None = None) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 (0660 owned by ``group`` if given).

    The mode is set by the umask at ``bind()``, so the socket is never reachable by
    other users, not even before a ``chmod``. A stale socket file (nobody accepts on it:
    an engine process that crashed) is replaced; one that is still served raises
    :class:`OSError` (``EADDRINUSE``). Blocks briefly.
    """
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: its server is gone
            else:
                raise OSError(98, f"another engine process serves {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mask = 0o117 if group is not None else 0o177
    old = os.umask(mask)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    if group is not None:
        gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    sock.listen(2048)
    return sock
