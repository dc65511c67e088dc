"""An in-process ASGI client for adapter tests: exact control of receive() and send()."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio


@dataclass
class Response:
    """What the app sent: status, headers, body chunks, and whether it ended cleanly."""

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False
    error: BaseException | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: str) -> str | None:
        values = [v.decode("latin-1") for n, v in self.headers if n == name.lower().encode()]
        return ",".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """Drives one ASGI HTTP request.

    ``body`` chunks are handed to ``receive()`` one at a time (``received`` counts them);
    after the last, ``receive()`` waits until :meth:`disconnect` is called or the response
    completed, then reports ``http.disconnect``; a disconnect preempts unsent chunks, as in
    uvicorn.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.response = Response()
        self.received = 0
        self.disconnected = anyio.Event()
        self.first_body = anyio.Event()
        self.started = anyio.Event()

    def disconnect(self) -> None:
        self.disconnected.set()

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        query: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: Sequence[bytes] = (b"",),
        raw_path: bytes | None = None,
        root_path: str = "",
        server: tuple[str, int | None] | None = ("testserver", 8000),
        client: tuple[str, int] | None = ("127.0.0.1", 50123),
        scheme: str = "http",
        http_version: str = "1.1",
    ) -> Response:
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": http_version,
            "method": method,
            "scheme": scheme,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": root_path,
            "headers": list(headers),
            "server": server,
            "client": client,
        }
        chunks = list(body) or [b""]
        response = self.response

        async def receive() -> dict[str, Any]:
            if self.received < len(chunks) and not self.disconnected.is_set():
                index = self.received
                self.received += 1
                return {
                    "type": "http.request",
                    "body": chunks[index],
                    "more_body": index < len(chunks) - 1,
                }
            while not (self.disconnected.is_set() or response.complete):
                await self.disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            response.messages.append(message)
            if message["type"] == "http.response.start":
                assert response.status is None, "response started twice"
                response.status = message["status"]
                response.headers = list(message.get("headers", []))
                self.started.set()
            elif message["type"] == "http.response.body":
                assert response.status is not None, "body before start"
                assert not response.complete, "body after the end"
                if message.get("body"):
                    response.chunks.append(message["body"])
                    self.first_body.set()
                if not message.get("more_body", False):
                    response.complete = True
                    self.disconnected.set()  # wake receive(): uvicorn reports disconnect now

        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            response.error = exc
        return response


async def request(app: Any, *args: Any, **kwargs: Any) -> Response:
    """One request through ``app``; see :meth:`Client.request`."""
    return await Client(app).request(*args, **kwargs)
