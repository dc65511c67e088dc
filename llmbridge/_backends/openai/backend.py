"""A backend that calls OpenAI-compatible HTTP APIs (OpenAI, vLLM, TGI, llama.cpp's
server, Ollama, or another llmbridge): one or more upstreams, over TCP or a Unix socket,
each through one pooled ``aiohttp.ClientSession``.

The sessions live on the engine's own event loop for the engine's whole life, so every
thread and coroutine of the process shares their connection pools, and no request ever
meets a session bound to a loop that has closed.

Why aiohttp and not httpx (which llmbridge's own clients use): this is the hot path of
a gateway, one read per streamed chunk on the engine thread. Read for read, aiohttp's
C parser and plain asyncio protocol cost a third of httpx's h11 + httpcore + anyio
stack (``benchmarks/upstream_clients.py``: 1.3 against 3.6 CPU ms a 20-token stream on
the same uvloop loop), and its connection pool hands out a connection in constant
time where httpcore's walks every connection it holds (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from ..._core.channel import Request
from ..._core.drivers import _positive, serve_async
from ..._core.jobs import Job, JobQueue
from ..._exceptions import BackendError, LLMBridgeError, Timeout, UpstreamError
from ..._sansio.sse import SSEDecoder, encode_event
from .errors import CREDENTIALS, counts_against, final_error, is_429, status_error
from .upstreams import Balancer, Upstream, UpstreamState
from .wire import (
    Call,
    Progress,
    json_object,
    reason,
    relayed,
    stream_error,
)

try:
    import aiohttp
except ImportError:  # pragma: no cover - depends on the environment
    # The name stays importable without the http extra (``from llmbridge.backends
    # import *``); building an OpenAIBackend raises instead (_require_aiohttp).
    pass

__all__ = ["OpenAIBackend", "Upstream"]

logger = logging.getLogger("llmbridge.openai")


def _require_aiohttp() -> None:
    """Raise an ``ImportError`` naming the extra when aiohttp is missing.

    Checked when an :class:`OpenAIBackend` is built, not at import, so that the name
    imports without aiohttp (``from llmbridge.backends import *`` in an app without the
    ``http`` extra).
    """
    if "aiohttp" not in globals():
        raise ImportError(
            'llmbridge.backends.OpenAIBackend needs aiohttp: pip install "llmbridge[http]"'
        )


class _Attempt:
    """One try on one upstream: whether any output reached the job (then no failover)."""

    __slots__ = ("emitted",)

    def __init__(self) -> None:
        self.emitted = False


class OpenAIBackend:
    """Drives OpenAI-compatible APIs: ``/chat/completions`` and ``/completions``.

    ``base_url`` names one upstream (``uds``: reached through that Unix socket, see
    :class:`Upstream`); ``upstreams`` (a list of :class:`Upstream` or URLs) names
    several. Each attempt goes to the available upstream with the fewest outstanding
    requests per unit of weight. An upstream that fails ``failures`` times in a row
    (refused or broken connection, timeout, 429, 5xx, our key refused, a non-OpenAI
    404) cools down for
    ``cooldown`` seconds, when it gets no requests, then one request probes it. A request
    that fails before its first chunk moves on to the next available upstream (each
    upstream once); after the first chunk it never does, so no client sees text twice.
    :attr:`stats` holds the counters per upstream.

    Engine requests: with ``messages=[...]`` (or :meth:`~llmbridge.Engine.chat`) the
    call goes to ``/chat/completions``, else to ``/completions`` with the prompt;
    ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, penalties and
    ``user`` are forwarded, ``model`` (per request, else the backend's, mapped by the
    upstream's ``models``) names the model. ``stream`` (per request or the backend's
    default) says whether the upstream streams; ``stream=False`` asks for whole answers.

    Passthrough (``passthrough = True``): the ``/v1`` routes hand over the client's whole
    body as ``params["openai"]``; it is forwarded field for field (tools,
    response_format, logprobs, n, logit_bias, ...; only ``model`` is mapped), streamed
    upstream only if the client asked for a stream, and the answer is relayed as it
    came, so every response field reaches the client. The stream's text is then the
    wire form (the JSON body, or SSE events), which is what every policy caches, shares
    and retries.

    Errors: an upstream's own 4xx whose body is an OpenAI error object (an invalid tool
    schema, a context overflow, an unknown model) is :class:`~llmbridge.UpstreamRejected`
    with the upstream's status: the request's fault, relayed to the client, never failed
    over, retried or counted by a breaker. Any other error status becomes
    :class:`~llmbridge.UpstreamError` (``upstream_status``, ``retryable`` for 429 and
    5xx, ``retry_after``), its text only in the log: 401/403 (our key, logged at warning
    with the request id), 429 (a 429 to the client when every upstream said so), 5xx,
    an HTML 404 from a wrong base URL. A broken connection or a stream that ends before
    its finish is a retryable ``UpstreamError``; a timeout is
    :class:`~llmbridge.Timeout`. Cancelling a stream cancels its task, which closes the
    upstream response (and its connection) at once.

    Limits, explicit and sized from the configuration: ``max_concurrency`` caps
    requests in flight (the rest wait in the engine's queue, counted in
    ``Engine.queued``); each upstream gets ``max_connections`` connections (default:
    ``max_concurrency``, so no admitted request waits for a connection), each kept open
    ``keepalive_expiry`` seconds when idle, so a burst does not pay new connections
    again. ``timeout`` bounds each read (seconds between bytes) and the wait for a
    connection, ``connect_timeout`` a connection's setup. Proxies come from the
    environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``, read once per upstream when
    the engine starts), certificates from the system's store.
    HTTP/1.1 only (what vLLM, TGI, llama.cpp's server and Ollama serve). Construct it
    anywhere; the sessions are created on the engine loop (:meth:`aopen`).

    >>> backend = OpenAIBackend("http://127.0.0.1:8000/v1", api_key="sk-...", model="m")
    """

    #: The ``/v1`` routes forward whole request bodies to this backend.
    passthrough = True

    def __init__(
        self,
        base_url: str | None = None,
        *,
        uds: str | os.PathLike[str] | None = None,
        upstreams: Sequence[Upstream | str] | None = None,
        api_key: str | None = None,
        model: str | None = None,
        stream: bool = True,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        max_connections: int | None = None,
        keepalive_expiry: float = 5.0,
        headers: Mapping[str, str] | None = None,
        max_concurrency: int = 256,
        failures: int = 3,
        cooldown: float = 5.0,
    ) -> None:
        _require_aiohttp()
        if (base_url is None) == (upstreams is None):
            raise ValueError("give OpenAIBackend either base_url or upstreams=[...]")
        if upstreams is None:
            assert base_url is not None
            upstreams = [Upstream(base_url, api_key=api_key, uds=uds)]
        elif uds is not None:
            raise ValueError("with upstreams=[...], give each Upstream its own uds=")
        configured = [
            u if isinstance(u, Upstream) else Upstream(u, api_key=api_key) for u in upstreams
        ]
        if not configured:
            raise ValueError("upstreams must name at least one upstream")
        self.upstreams: tuple[Upstream, ...] = tuple(configured)
        self.base_url = self.upstreams[0].url
        self.api_key = api_key
        self.model = model
        self.stream = stream
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_concurrency = _positive("max_concurrency", max_concurrency)
        self.max_connections = _positive(
            "max_connections", self.max_concurrency if max_connections is None else max_connections
        )
        if not keepalive_expiry > 0:
            raise ValueError(f"keepalive_expiry must be > 0, got {keepalive_expiry!r}")
        self.keepalive_expiry = keepalive_expiry
        self.headers = dict(headers or {})
        self.failures = _positive("failures", failures)
        if not cooldown >= 0:
            raise ValueError(f"cooldown must be >= 0, got {cooldown!r}")
        self.cooldown = cooldown
        self._states = [
            UpstreamState(u, failures=self.failures, cooldown=cooldown) for u in self.upstreams
        ]
        self._balancer = Balancer(self._states)
        self._in_flight = 0
        # The upstreams (by id) whose last failure was a 429 (engine loop only).
        self._throttled: set[int] = set()

    def __repr__(self) -> str:
        urls = ", ".join(repr(u.url) for u in self.upstreams)
        return f"OpenAIBackend({urls}, model={self.model!r})"

    @property
    def client(self) -> aiohttp.ClientSession | None:
        """The first upstream's session while the engine runs (``None`` before and
        after)."""
        session: aiohttp.ClientSession | None = self._states[0].session
        return session

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the limits and counters: ``in_flight`` (requests running now),
        ``max_concurrency``, ``max_connections`` (per upstream), and ``upstreams``: per
        upstream ``requests``, ``failures``, ``failovers``, ``outstanding``,
        ``cooling_down``, ``cooldowns``. Any thread; never blocks."""
        return {
            "in_flight": self._in_flight,
            "max_concurrency": self.max_concurrency,
            "max_connections": self.max_connections,
            "upstreams": [state.as_dict() for state in self._states],
        }

    def serve(self, jobs: JobQueue) -> None:
        """Run requests on the engine thread's event loop until the engine closes."""
        serve_async(self, jobs, max_concurrency=self.max_concurrency)

    async def aopen(self) -> None:
        """Open each upstream's session on the engine loop (called by the engine)."""
        # One TLS context for every session (each would load the CA store again).
        tls = ssl.create_default_context()
        for state in self._states:
            state.session = self._session(state.upstream, tls)
            state.proxy = _env_proxy(state.upstream)

    def _session(self, upstream: Upstream, tls: ssl.SSLContext) -> aiohttp.ClientSession:
        headers = {"Accept": "application/json", **self.headers}
        if upstream.api_key:
            headers["Authorization"] = f"Bearer {upstream.api_key}"
        connector: aiohttp.BaseConnector
        if upstream.uds is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,
                keepalive_timeout=self.keepalive_expiry,
                ssl=tls,
            )
        else:
            connector = aiohttp.UnixConnector(
                os.fspath(upstream.uds),
                limit=self.max_connections,
                keepalive_timeout=self.keepalive_expiry,
            )
        return aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.timeout,  # the wait for a pooled connection, and its setup
                sock_connect=self.connect_timeout,
                sock_read=self.timeout,
            ),
            # Not trust_env: it reads ~/.netrc on a worker thread for every request.
            # The proxy variables are read once per upstream instead (_env_proxy).
            trust_env=False,
            raise_for_status=False,
        )

    async def aclose(self) -> None:
        """Close the sessions and their connections (called by the engine as it stops)."""
        for state in self._states:
            session, state.session = state.session, None
            if session is not None:
                await session.close()

    async def generate(self, request: Request, job: Job) -> None:
        """Run one request upstream, failing over before its first chunk, and write its
        output to ``job`` (engine loop only)."""
        call = Call.of(request.prompt, request.params, model=self.model, stream=self.stream)
        tried: list[UpstreamState] = []
        errors: list[LLMBridgeError] = []
        self._in_flight += 1
        try:
            while True:
                state = self._balancer.pick(tried)
                if state is None:
                    raise self._final(errors) if errors else self._none_left()
                if state.session is None:
                    raise BackendError("the OpenAIBackend is not open: run it in an Engine")
                tried.append(state)
                attempt = _Attempt()
                state.begin()
                # None: neither a success nor the upstream's failure (a cancellation, a
                # bug of ours), so the breaker neither closes nor counts it.
                failed: bool | None = None
                try:
                    await self._attempt(state, call, job, attempt)
                    failed = False
                    return
                except LLMBridgeError as exc:
                    failed = counts_against(exc)
                    self._note(request, state, exc, failed=failed)
                    if not failed or attempt.emitted or job.ended:
                        raise
                    state.failovers += 1
                    logger.info(
                        "request %s: upstream %s failed before its first chunk (%s); failing over",
                        request.id,
                        state.upstream.label,
                        exc.message,
                    )
                    errors.append(exc)
                finally:
                    if failed is False:
                        self._throttled.discard(id(state))
                    state.end(failed=failed)
        finally:
            self._in_flight -= 1

    def _note(
        self, request: Request, state: UpstreamState, error: LLMBridgeError, *, failed: bool
    ) -> None:
        """Remember whether ``state`` last failed with a 429; log a refusal of our key."""
        if failed:
            if is_429(error):
                self._throttled.add(id(state))
            else:
                self._throttled.discard(id(state))
        if isinstance(error, UpstreamError) and error.upstream_status in CREDENTIALS:
            # The operator's key is wrong for this upstream: the client only learns that
            # the upstream refused us (its text may echo part of the key); the log says.
            logger.warning(
                "request %s: upstream %s refused this server's credentials: %s",
                request.id,
                state.upstream.label,
                error.message,
            )

    def _final(self, errors: list[LLMBridgeError]) -> LLMBridgeError:
        """The error a request fails with once every upstream failed it."""
        return final_error(errors, self._balancer.soonest_back())

    def _none_left(self) -> LLMBridgeError:
        cooling = [s for s in self._states if s.cooling_down]
        if cooling and all(id(s) in self._throttled for s in cooling):
            # They cool down after 429s: the client is told to slow down, as they said.
            return UpstreamError(
                "every upstream is cooling down after answering 429",
                upstream_status=429,
                retryable=True,
                retry_after=self._balancer.soonest_back(),
                summary="every upstream answered 429",
            )
        return UpstreamError(
            "every upstream is cooling down after failures",
            retryable=True,
            retry_after=self._balancer.soonest_back(),
            summary="no upstream is available",
        )

    async def _attempt(self, state: UpstreamState, call: Call, job: Job, attempt: _Attempt) -> None:
        session: aiohttp.ClientSession = state.session
        sent_model = state.upstream.model_for(call.model, self.model)
        body = call.body_for(sent_model)
        url = state.upstream.url + call.path
        try:
            if call.stream:
                await self._streamed(
                    session, url, state.proxy, call, body, sent_model, job, attempt
                )
            else:
                await self._whole(session, url, state.proxy, call, body, sent_model, job, attempt)
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError is one
            raise Timeout(f"the upstream timed out ({type(exc).__name__})") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"the upstream connection failed: {type(exc).__name__}: {exc}",
                retryable=True,
                summary="the upstream connection failed",
            ) from exc

    async def _whole(
        self,
        session: aiohttp.ClientSession,
        url: str,
        proxy: str | None,
        call: Call,
        body: dict[str, Any],
        sent_model: str | None,
        job: Job,
        attempt: _Attempt,
    ) -> None:
        async with session.post(url, json=body, proxy=proxy) as response:
            await _raise_for_status(response)
            raw = (await response.read()).decode("utf-8", errors="replace")
        data = json_object(raw)
        progress = Progress()
        text = progress.read(data, whole=True)
        if "choices" not in data or not isinstance(data["choices"], list):
            raise UpstreamError("the upstream's answer has no choices")
        tokens = progress.completion_tokens
        if call.relay:
            attempt.emitted = True
            job.emit(relayed(raw, data, call.model, sent_model), tokens or 1)
        elif text:
            attempt.emitted = True
            job.emit(text, tokens or 1)
        job.finish(
            reason(progress.finish),
            prompt_tokens=progress.prompt_tokens,
            completion_tokens=tokens,
        )

    async def _streamed(
        self,
        session: aiohttp.ClientSession,
        url: str,
        proxy: str | None,
        call: Call,
        body: dict[str, Any],
        sent_model: str | None,
        job: Job,
        attempt: _Attempt,
    ) -> None:
        # Leaving this block for any reason (the end, an error, the task's cancellation
        # when the consumer goes away) closes the response; unread, its connection is
        # closed rather than pooled, so the upstream sees the disconnect at once.
        async with session.post(url, json=body, proxy=proxy) as response:
            await _raise_for_status(response)
            decoder = SSEDecoder()
            progress = Progress()
            async for piece in response.content.iter_any():
                out: list[bytes] = []
                pieces = progress.pieces
                for event in decoder.feed(piece):
                    if event.data.strip() == "[DONE]":
                        if out:
                            attempt.emitted = True
                            tokens = progress.pieces - pieces
                            if not await job.aemit(b"".join(out).decode(), tokens):
                                return
                        job.finish(
                            reason(progress.finish),
                            prompt_tokens=progress.prompt_tokens,
                            completion_tokens=progress.completion_tokens or progress.pieces,
                        )
                        await _read_to_end(response)
                        return
                    data = json_object(event.data)
                    if "error" in data:
                        raise stream_error(data["error"])
                    text = progress.read(data, whole=False)
                    if call.relay:
                        out.append(encode_event(relayed(event.data, data, call.model, sent_model)))
                    elif text:
                        attempt.emitted = True
                        if not await job.aemit(text):
                            return  # the consumer left: closing the response tells the upstream
                if out:
                    attempt.emitted = True
                    # One emit per network read: the events that arrived together
                    # travel together (coalescing keeps them whole SSE events).
                    if not await job.aemit(b"".join(out).decode(), progress.pieces - pieces):
                        return
            raise UpstreamError(
                "the upstream closed the stream before it finished (no data: [DONE])",
                retryable=True,
            )


#: How long a finished stream's body may take to end after ``data: [DONE]`` (normally
#: it ends in the same read) before its connection is closed instead of reused.
_END_GRACE = 1.0


def _env_proxy(upstream: Upstream) -> str | None:
    """The proxy the environment names for ``upstream`` (``HTTPS_PROXY`` / ``HTTP_PROXY``
    by its scheme, unless ``NO_PROXY`` covers its host), as every HTTP client reads
    them; ``None`` for a Unix socket."""
    if upstream.uds is not None:
        return None
    parts = urllib.parse.urlsplit(upstream.url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


async def _read_to_end(response: aiohttp.ClientResponse) -> None:
    """Read what follows ``[DONE]`` (the body's last chunk): a response closed before its
    end closes its connection, so without this every stream paid a new connection."""
    if response.content.at_eof():
        return  # the usual case: the body's end came in the same read
    try:
        async with asyncio.timeout(_END_GRACE):
            async for _ in response.content.iter_any():
                pass
    except (TimeoutError, aiohttp.ClientError):
        pass  # the answer is complete; this connection just isn't reused


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    """Raise the error an upstream's error status stands for (see :mod:`.errors`),
    reading its body first."""
    if response.status >= 400:
        raise status_error(
            response.status,
            response.reason or "",
            response.headers.get("Retry-After"),
            await response.read(),
        )
