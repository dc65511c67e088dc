"""A backend that calls an OpenAI-compatible HTTP API (OpenAI, vLLM, TGI, llama.cpp
server, Ollama, or another llmbridge) through one pooled ``httpx.AsyncClient``.

The client lives on the engine's own event loop for the engine's whole life, so every
thread and coroutine of the process shares its connection pool, and no request ever
meets a client bound to a loop that has closed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._core.channel import Request
from .._core.drivers import _positive, serve_async
from .._core.jobs import Job, JobQueue
from .._exceptions import BackendError, Timeout, UpstreamError
from .._sansio.sse import SSEDecoder

try:
    import httpx
except ImportError:  # pragma: no cover - depends on the environment
    # The name stays importable without the http extra (``from llmbridge.backends
    # import *``); building an OpenAIBackend raises instead (_require_httpx).
    pass

__all__ = ["OpenAIBackend"]


def _require_httpx() -> None:
    """Raise an ``ImportError`` naming the extra when httpx is missing.

    Checked when an :class:`OpenAIBackend` is built, not at import, so that the name
    imports without httpx (``from llmbridge.backends import *`` in an app without the
    ``http`` extra).
    """
    if "httpx" not in globals():
        raise ImportError(
            'llmbridge.backends.OpenAIBackend needs httpx: pip install "llmbridge[http]"'
        )


# Engine parameters -> OpenAI request fields. Anything else in the params is not sent.
_FIELDS = {
    "max_new_tokens": "max_tokens",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "user": "user",
}


class OpenAIBackend:
    """Drives an OpenAI-compatible API: ``/chat/completions`` and ``/completions``.

    A request submitted with ``messages=[...]`` goes to ``/chat/completions``; one
    without goes to ``/completions`` with the prompt. ``max_new_tokens``,
    ``temperature``, ``top_p``, ``stop``, ``seed`` are forwarded, ``model`` (per
    request, else the backend's) names the upstream model. With ``stream=True`` (the
    default) the upstream streams and its SSE is parsed as it arrives, so text reaches
    the consumer token by token; ``stream=False`` asks for whole answers.

    Errors: an upstream error status becomes :class:`~llmbridge.UpstreamError` with the
    upstream's message and ``upstream_status``, ``retryable`` for 429 and 5xx (and
    ``retry_after`` from the ``Retry-After`` header); a connection that breaks, or a
    stream that ends before its finish, is a retryable ``UpstreamError``; a timeout is
    :class:`~llmbridge.Timeout`. Cancelling a stream cancels its task, which closes the
    upstream response (and its connection) at once, so the upstream sees the client go.

    ``timeout`` bounds reads and writes (seconds between bytes, not the whole answer),
    ``connect_timeout`` the connection; ``max_connections`` / ``max_keepalive`` size the
    pool; ``http2=True`` needs ``pip install "httpx[http2]"``. ``max_concurrency`` caps
    requests in flight (the rest wait in the engine's queue). Construct it anywhere; the
    client is created on the engine loop (:meth:`aopen`).

    >>> backend = OpenAIBackend("http://127.0.0.1:8000/v1", api_key="sk-...", model="m")
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        stream: bool = True,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        max_connections: int = 100,
        max_keepalive: int = 20,
        http2: bool = False,
        headers: Mapping[str, str] | None = None,
        max_concurrency: int = 256,
    ) -> None:
        _require_httpx()
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.stream = stream
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_connections = _positive("max_connections", max_connections)
        self.max_keepalive = _positive("max_keepalive", max_keepalive)
        self.http2 = http2
        self.headers = dict(headers or {})
        self.max_concurrency = _positive("max_concurrency", max_concurrency)
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.base_url!r}, model={self.model!r})"

    @property
    def client(self) -> httpx.AsyncClient | None:
        """The pooled client while the engine runs (``None`` before and after)."""
        return self._client

    def serve(self, jobs: JobQueue) -> None:
        """Run requests on the engine thread's event loop until the engine closes."""
        serve_async(self, jobs, max_concurrency=self.max_concurrency)

    async def aopen(self) -> None:
        """Create the pooled client on the engine loop (called by the engine)."""
        headers = {"Accept": "application/json", **self.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
            limits=httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=self.max_keepalive,
            ),
            http2=self.http2,
        )

    async def aclose(self) -> None:
        """Close the pooled client (called by the engine as it stops)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _body(self, request: Request) -> tuple[str, dict[str, Any]]:
        params = request.params
        body: dict[str, Any] = {}
        model = params.get("model", self.model)
        if model is not None:
            body["model"] = model
        for key, field in _FIELDS.items():
            value = params.get(key)
            if value is not None and field not in body:
                body[field] = value
        messages = params.get("messages")
        if messages is not None:
            body["messages"] = messages
            path = "/chat/completions"
        else:
            body["prompt"] = request.prompt
            path = "/completions"
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return path, body

    async def generate(self, request: Request, job: Job) -> None:
        """Run one request upstream and write its text to ``job`` (engine loop only)."""
        client = self._client
        if client is None:
            raise BackendError("the OpenAIBackend is not open: run it in an Engine")
        path, body = self._body(request)
        try:
            if self.stream:
                await self._streamed(client, path, body, job)
            else:
                await self._whole(client, path, body, job)
        except httpx.TimeoutException as exc:
            raise Timeout(f"the upstream timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"the upstream connection failed: {type(exc).__name__}: {exc}",
                retryable=True,
                summary="the upstream connection failed",
            ) from exc

    async def _whole(
        self, client: httpx.AsyncClient, path: str, body: dict[str, Any], job: Job
    ) -> None:
        response = await client.post(path, json=body)
        if response.status_code >= 400:
            raise _status_error(response, response.content)
        data = _json_object(response.content)
        choice = _first_choice(data)
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        raw_usage = data.get("usage")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        if isinstance(text, str) and text:
            job.emit(text, _int(usage.get("completion_tokens")) or 1)
        job.finish(
            _reason(choice.get("finish_reason")),
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
        )

    async def _streamed(
        self, client: httpx.AsyncClient, path: str, body: dict[str, Any], job: Job
    ) -> None:
        # Leaving this block for any reason (the end, an error, the task's cancellation
        # when the consumer goes away) closes the response; unread, its connection is
        # closed rather than pooled, so the upstream sees the disconnect at once.
        async with client.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                raise _status_error(response, await response.aread())
            decoder = SSEDecoder()
            finish: str | None = None
            usage: dict[str, Any] = {}
            async for piece in response.aiter_bytes():
                for event in decoder.feed(piece):
                    if event.data.strip() == "[DONE]":
                        job.finish(
                            _reason(finish),
                            prompt_tokens=_int(usage.get("prompt_tokens")),
                            completion_tokens=_int(usage.get("completion_tokens")),
                        )
                        return
                    data = _json_object(event.data)
                    if "error" in data:
                        raise _stream_error(data["error"])
                    if isinstance(data.get("usage"), dict):
                        usage = data["usage"]
                    choices = data.get("choices")
                    if not choices:
                        continue
                    choice = choices[0] if isinstance(choices[0], dict) else {}
                    delta = choice.get("delta")
                    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                    if isinstance(text, str) and text and not await job.aemit(text):
                        return  # the consumer left: closing the response tells the upstream
                    if choice.get("finish_reason"):
                        finish = str(choice["finish_reason"])
            raise UpstreamError(
                "the upstream closed the stream before it finished (no data: [DONE])",
                retryable=True,
            )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _reason(value: Any) -> str:
    return "length" if value == "length" else "stop"


def _json_object(raw: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise UpstreamError(
            f"the upstream sent invalid JSON: {exc}", summary="the upstream sent invalid JSON"
        ) from exc
    if not isinstance(data, dict):
        raise UpstreamError(f"the upstream sent {type(data).__name__}, expected a JSON object")
    return data


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamError("the upstream's answer has no choices")
    return choices[0]


def _message_of(raw: bytes) -> str:
    """The human part of an error body: OpenAI's ``error.message``, a problem's
    ``detail``, else the start of the text."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:200].decode(errors="replace").strip()
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        for key in ("detail", "message"):
            if isinstance(data.get(key), str):
                return str(data[key])
    return raw[:200].decode(errors="replace").strip()


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from LLM APIs, and not worth a parser here


def _status_error(response: httpx.Response, raw: bytes) -> UpstreamError:
    status = response.status_code
    detail = _message_of(raw) or response.reason_phrase
    return UpstreamError(
        f"the upstream answered {status}: {detail}",
        upstream_status=status,
        retryable=status == 429 or status >= 500,
        retry_after=_retry_after(response),
    )


def _stream_error(error: Any) -> UpstreamError:
    message = error.get("message") if isinstance(error, dict) else error
    return UpstreamError(
        f"the upstream failed mid-stream: {message}",
        retryable=False,
        summary="the upstream failed mid-stream",
    )
