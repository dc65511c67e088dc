"""WSGI semantics of llmbridge.asgi, in process: environ, headers, status, bodies,
wsgi.input, exceptions, start_response/exc_info, close() exactly once."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.validate import validator

import anyio
import anyio.lowlevel
import pytest
from asgi_driver import Client, request

from llmbridge.asgi import ASYNC_BODY_KEY, WSGIMiddleware, build_environ, to_asgi

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


def echo_environ(seen: list[Environ]) -> Callable[[Environ, StartResponse], list[bytes]]:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        seen.append(dict(environ))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


class Counted:
    """A response iterable that counts close() calls and may fail at a given chunk."""

    def __init__(self, chunks: list[bytes], *, fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.closed = 0
        self.yielded = 0

    def __iter__(self) -> Iterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_at:
                raise RuntimeError("boom in the body")
            self.yielded += 1
            yield chunk

    def close(self) -> None:
        self.closed += 1


# -- environ -------------------------------------------------------------------------


async def test_environ_has_pep3333_keys_and_passes_wsgiref_validator() -> None:
    """A validated app sees every required environ key with the right type."""
    seen: list[Environ] = []
    app = to_asgi(validator(echo_environ(seen)))
    response = await request(
        app,
        "POST",
        "/a/b",
        query=b"x=1&y=%20",
        headers=[(b"host", b"example.com:8000"), (b"content-type", b"text/plain")],
        body=[b"hello"],
    )
    assert response.error is None
    assert (response.status, response.body) == (200, b"ok")
    env = seen[0]
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/a/b"
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["SERVER_NAME"] == "testserver"
    assert env["SERVER_PORT"] == "8000"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["CONTENT_TYPE"] == "text/plain"
    assert "HTTP_CONTENT_TYPE" not in env
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["REMOTE_PORT"] == "50123"
    assert env["wsgi.version"] == (1, 0)
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multithread"] is True
    assert env["wsgi.run_once"] is False
    assert callable(env["wsgi.errors"].write)
    assert callable(env[ASYNC_BODY_KEY])


async def test_headers_are_cgi_named_and_duplicates_joined() -> None:
    """HTTP_ names, comma-joined duplicates, cookies joined with '; ', latin-1 values."""
    seen: list[Environ] = []
    await request(
        to_asgi(echo_environ(seen)),
        headers=[
            (b"x-thing", b"a"),
            (b"X-Thing", b"b"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            (b"content-length", b"0"),
            (b"x-latin", "café".encode("latin-1")),
            (b"accept", b"*/*"),
        ],
    )
    env = seen[0]
    assert env["HTTP_X_THING"] == "a,b"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["CONTENT_LENGTH"] == "0"
    assert "HTTP_CONTENT_LENGTH" not in env
    assert env["HTTP_X_LATIN"] == "café"
    assert env["HTTP_ACCEPT"] == "*/*"


async def test_duplicate_header_limit_is_asgirefs_option_and_answers_431() -> None:
    """``duplicate_header_limit`` (asgiref's option, default 100) is accepted; one header
    name repeated more often is a 431 problem+json the app never sees."""
    seen: list[Environ] = []
    app = WSGIMiddleware(echo_environ(seen), duplicate_header_limit=3)
    ok = await request(app, headers=[(b"x-a", b"1")] * 3)
    assert ok.status == 200
    assert seen[0]["HTTP_X_A"] == "1,1,1"
    over = await request(app, headers=[(b"x-a", b"1")] * 4)
    assert over.status == 431
    assert over.header("content-type") == "application/problem+json"
    assert over.json()["status"] == 431
    assert len(seen) == 1
    default = await request(to_asgi(echo_environ(seen)), headers=[(b"x-b", b"v")] * 101)
    assert default.status == 431
    with pytest.raises(ValueError, match="duplicate_header_limit"):
        WSGIMiddleware(echo_environ([]), duplicate_header_limit=-1)


async def test_many_duplicate_headers_join_in_one_pass_without_a_limit() -> None:
    """50,000 duplicates with the limit off: every value arrives, joined once, in order."""
    seen: list[Environ] = []
    values = [str(i).encode() for i in range(50_000)]
    app = WSGIMiddleware(echo_environ(seen), duplicate_header_limit=None)
    response = await request(app, headers=[(b"x-many", v) for v in values])
    assert response.status == 200
    assert seen[0]["HTTP_X_MANY"] == ",".join(v.decode() for v in values)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/x", ("/api", "/x")),
        ("/x", ("/api", "/x")),
        ("/api", ("/api", "")),
        ("/apix", ("/api", "/apix")),
    ],
)
async def test_script_name_option_is_the_mount_prefix(path: str, expected: tuple[str, str]) -> None:
    """``script_name=`` (default ``$SCRIPT_NAME``) becomes SCRIPT_NAME; a path under it
    loses the prefix, one beside it (``/apix``) keeps its path."""
    seen: list[Environ] = []
    await request(WSGIMiddleware(echo_environ(seen), script_name="/api/"), "GET", path)
    assert (seen[0]["SCRIPT_NAME"], seen[0]["PATH_INFO"]) == expected


async def test_script_name_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like a2wsgi, the ``SCRIPT_NAME`` environment variable is the default prefix."""
    monkeypatch.setenv("SCRIPT_NAME", "/mnt")
    seen: list[Environ] = []
    await request(to_asgi(echo_environ(seen)), "GET", "/mnt/y")
    assert (seen[0]["SCRIPT_NAME"], seen[0]["PATH_INFO"]) == ("/mnt", "/y")
    with pytest.raises(ValueError, match="script_name"):
        WSGIMiddleware(echo_environ([]), script_name="api")


async def test_header_names_with_underscores_are_dropped() -> None:
    """X_Forwarded_For can't shadow X-Forwarded-For (as gunicorn and nginx do)."""
    seen: list[Environ] = []
    await request(
        to_asgi(echo_environ(seen)),
        headers=[(b"x-forwarded-for", b"1.2.3.4"), (b"x_forwarded_for", b"6.6.6.6")],
    )
    assert seen[0]["HTTP_X_FORWARDED_FOR"] == "1.2.3.4"


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ({"path": "/app/x", "root_path": "/app"}, ("/app", "/x")),
        ({"path": "/x", "root_path": "/app"}, ("/app", "/x")),
        ({"path": "/app", "root_path": "/app"}, ("/app", "")),
        ({"path": "/caf\xe9", "raw_path": b"/caf%C3%A9"}, ("", "/caf\xc3\xa9")),
        ({"path": "/a b", "raw_path": b"/a%20b"}, ("", "/a b")),
        ({"path": "/\ufffd", "raw_path": b"/%FF"}, ("", "/\xff")),
    ],
)
async def test_script_name_and_path_info_are_latin1_native_strings(
    scope: dict[str, Any], expected: tuple[str, str]
) -> None:
    """PATH_INFO is the unquoted path as bytes-in-latin-1; SCRIPT_NAME the root path."""
    full = {"type": "http", "method": "GET", "query_string": b"", "headers": [], **scope}
    env = build_environ(full, None)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == expected


async def test_server_name_falls_back_to_host_header() -> None:
    """Without scope['server'], SERVER_NAME/PORT come from Host, then the scheme."""
    base = {"type": "http", "method": "GET", "path": "/", "query_string": b""}
    env = build_environ({**base, "headers": [(b"host", b"h.example:81")]}, None)
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("h.example", "81")
    env = build_environ({**base, "headers": [(b"host", b"[::1]")], "scheme": "https"}, None)
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("[::1]", "443")
    env = build_environ({**base, "headers": []}, None)
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("localhost", "80")


async def test_https_scheme_and_http2_protocol_pass_through() -> None:
    """wsgi.url_scheme and SERVER_PROTOCOL follow the scope."""
    seen: list[Environ] = []
    await request(to_asgi(echo_environ(seen)), scheme="https", http_version="2")
    assert seen[0]["wsgi.url_scheme"] == "https"
    assert seen[0]["SERVER_PROTOCOL"] == "HTTP/2"


# -- status and response headers -------------------------------------------------------


async def test_status_reason_phrase_and_headers_reach_the_client() -> None:
    """Any 3-digit status with any phrase; header names lowercased, values kept."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response(
            "299 Something Custom",
            [("Content-Type", "text/plain"), ("X-Multi", "1"), ("X-Multi", "2"), ("X-Empty", "")],
        )
        return [b"body"]

    response = await request(to_asgi(app))
    assert response.status == 299
    assert response.headers.count((b"x-multi", b"1")) == 1
    assert (b"x-multi", b"2") in response.headers
    assert (b"x-empty", b"") in response.headers
    assert response.header("content-length") == "4"  # one chunk: length is known


async def test_hop_by_hop_headers_are_left_to_the_server() -> None:
    """Connection/Transfer-Encoding from the app are dropped: framing is the server's."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response(
            "200 OK", [("Connection", "close"), ("Transfer-Encoding", "chunked"), ("X-A", "b")]
        )
        return [b"x"]

    response = await request(to_asgi(app))
    names = [name for name, _ in response.headers]
    assert b"connection" not in names
    assert b"transfer-encoding" not in names
    assert (b"x-a", b"b") in response.headers


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        ("OK", []),
        ("2000 OK", []),
        (200, []),
        ("200 OK", [("Bad\nName", "v")]),
        ("200 OK", [("X", "line\r\nbreak")]),
        ("200 OK", (("X", "tuple-of-tuples"),)),
        ("200 OK", [("X", 1)]),
        ("200 OK", [("X", "€ not latin-1")]),
    ],
)
async def test_invalid_status_or_headers_become_a_500_problem(status: Any, headers: Any) -> None:
    """A malformed start_response() is an app error: 500 problem+json, never a crash."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response(status, headers)
        return [b""]

    response = await request(to_asgi(app))
    assert response.status == 500
    assert response.header("content-type") == "application/problem+json"
    assert response.json()["status"] == 500


# -- bodies ----------------------------------------------------------------------------


async def test_chunks_are_sent_as_produced_and_empty_ones_skipped() -> None:
    """Each non-empty chunk is one body message; the last message ends the body."""
    body = Counted([b"a", b"", b"bc", b"d"])

    def app(environ: Environ, start_response: StartResponse) -> Counted:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    response = await request(to_asgi(app))
    assert response.chunks == [b"a", b"bc", b"d"]
    assert response.complete
    assert response.header("content-length") is None  # unknown length: the server chunks
    assert body.closed == 1


async def test_headers_wait_for_the_first_non_empty_chunk() -> None:
    """A generator may call start_response lazily, and change it before any byte is out."""

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("X-First", "1")])
        yield b""
        try:
            raise ValueError("changed my mind")
        except ValueError:
            start_response("503 Busy", [("X-Second", "1")], sys.exc_info())
        yield b"late"

    response = await request(to_asgi(app))
    assert response.status == 503
    assert (b"x-second", b"1") in response.headers
    assert (b"x-first", b"1") not in response.headers
    assert response.body == b"late"


async def test_empty_body_still_sends_headers() -> None:
    """An app that yields nothing gets its status and an empty, complete body."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("204 No Content", [])
        return []

    response = await request(to_asgi(app))
    assert (response.status, response.body, response.complete) == (204, b"", True)


async def test_write_callable_sends_before_the_iterable() -> None:
    """The legacy write() from start_response sends at once, in order."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"one,")
        write(b"two,")
        return [b"three"]

    response = await request(to_asgi(app))
    assert response.body == b"one,two,three"
    assert response.header("content-length") is None  # not known once write() was used


async def test_non_bytes_chunk_is_a_500_and_the_iterable_is_closed() -> None:
    """Yielding str is a PEP 3333 violation: 500 problem, close() still called once."""

    class StrBody(Counted):
        def __iter__(self) -> Iterator[bytes]:
            yield "text"  # type: ignore[misc]

    body = StrBody([])

    def app(environ: Environ, start_response: StartResponse) -> StrBody:
        start_response("200 OK", [])
        return body

    response = await request(to_asgi(app))
    assert response.status == 500
    assert body.closed == 1


# -- exceptions and exc_info -------------------------------------------------------------


async def test_exception_before_start_response_is_a_500_problem() -> None:
    """A view that raises: the client gets application/problem+json, not a traceback,
    and the error then propagates to the server, which logs it (as a2wsgi and asgiref do)."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        raise KeyError("secret detail")

    response = await request(to_asgi(app))
    assert response.status == 500
    assert response.header("content-type") == "application/problem+json"
    assert b"secret" not in response.body
    assert isinstance(response.error, KeyError)


async def test_exception_in_the_body_before_any_byte_is_a_500_and_closes() -> None:
    """Failing on the first chunk: headers were never sent, so the answer is a 500."""
    body = Counted([b"a"], fail_at=0)

    def app(environ: Environ, start_response: StartResponse) -> Counted:
        start_response("200 OK", [])
        return body

    response = await request(to_asgi(app))
    assert response.status == 500
    assert body.closed == 1


async def test_exception_after_headers_aborts_the_response_and_closes() -> None:
    """Once bytes are out the error propagates (the server drops the connection)."""
    body = Counted([b"a", b"b", b"c"], fail_at=2)

    def app(environ: Environ, start_response: StartResponse) -> Counted:
        start_response("200 OK", [])
        return body

    response = await request(to_asgi(app))
    assert response.status == 200
    assert response.body == b"ab"
    assert not response.complete
    assert isinstance(response.error, RuntimeError)
    assert body.closed == 1


async def test_exc_info_after_headers_reraises_the_apps_error() -> None:
    """start_response(..., exc_info) once headers are out re-raises that error."""
    raised: list[BaseException] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        try:
            raise LookupError("late failure")
        except LookupError:
            try:
                start_response("500 Error", [], sys.exc_info())
            except LookupError as exc:
                raised.append(exc)
                raise

    response = await request(to_asgi(app))
    assert len(raised) == 1
    assert isinstance(response.error, LookupError)
    assert response.body == b"partial"
    assert not response.complete


async def test_start_response_twice_without_exc_info_is_an_error() -> None:
    """A second start_response() without exc_info is refused (500)."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        start_response("201 Created", [])
        return [b""]

    response = await request(to_asgi(app))
    assert response.status == 500


async def test_returning_without_start_response_is_a_500() -> None:
    """An iterable returned without start_response() is an app error."""
    body = Counted([])

    def app(environ: Environ, start_response: StartResponse) -> Counted:
        return body

    response = await request(to_asgi(app))
    assert response.status == 500
    assert body.closed == 1


async def test_close_error_after_a_complete_response_is_reported() -> None:
    """An iterable whose close() raises after the body went out is logged, not hidden."""

    class BadClose(Counted):
        def close(self) -> None:
            super().close()
            raise OSError("close failed")

    body = BadClose([b"x", b"y"])

    def app(environ: Environ, start_response: StartResponse) -> BadClose:
        start_response("200 OK", [])
        return body

    response = await request(to_asgi(app))
    assert response.body == b"xy"
    assert response.complete
    assert isinstance(response.error, OSError)
    assert body.closed == 1


# -- wsgi.input -------------------------------------------------------------------------


def reader(how: Callable[[Any], list[bytes]]) -> Callable[[Environ, StartResponse], list[bytes]]:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        parts = how(environ["wsgi.input"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"|".join(parts)]

    return app


BODY = [b"line one\nline", b" two\n", b"", b"li", b"ne three\nno newline"]


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        (lambda f: [f.read()], b"line one\nline two\nline three\nno newline"),
        (lambda f: [f.read(-1)], b"line one\nline two\nline three\nno newline"),
        (lambda f: [f.read(3), f.read(10), f.read(0)], b"lin|e one\nline|"),
        (
            lambda f: [f.read(1000), f.read(5), f.read()],
            b"line one\nline two\nline three\nno newline||",
        ),
        (
            lambda f: [f.readline(), f.readline(), f.readline(), f.readline(), f.readline()],
            b"line one\n|line two\n|line three\n|no newline|",
        ),
        (lambda f: [f.readline(4), f.readline(100)], b"line| one\n"),
        (lambda f: [f.readline(9), f.readline()], b"line one\n|line two\n"),
        (lambda f: f.readlines(), b"line one\n|line two\n|line three\n|no newline"),
        (lambda f: f.readlines(10), b"line one\n|line two\n"),
        (lambda f: list(f), b"line one\n|line two\n|line three\n|no newline"),
        (
            lambda f: [f.read(4), f.readline(), f.read()],
            b"line| one\n|line two\nline three\nno newline",
        ),
    ],
)
async def test_wsgi_input_reads_across_chunk_boundaries(
    how: Callable[[Any], list[bytes]], expected: bytes
) -> None:
    """read/readline/readlines/iteration see one continuous body, however it was split."""
    response = await request(to_asgi(reader(how)), "POST", body=BODY)
    assert response.body == expected


async def test_chunked_request_body_without_content_length_reads_to_the_end() -> None:
    """wsgi.input_terminated: Flask reads a chunked upload with no Content-Length."""
    from flask import Flask
    from flask import request as flask_request

    flask_app = Flask(__name__)

    @flask_app.post("/upload")
    def upload() -> dict[str, int]:
        return {"size": len(flask_request.get_data())}

    body = [b"x" * 1000] * 50
    response = await request(to_asgi(flask_app), "POST", "/upload", body=body)
    assert response.json() == {"size": 50_000}


async def test_request_body_is_streamed_not_buffered_whole() -> None:
    """The app sees the first chunk before the client sent the rest (bounded buffer)."""
    seen_when_first_read: list[int] = []
    client: Client

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        stream = environ["wsgi.input"]
        first = stream.read(10)
        seen_when_first_read.append(client.received)
        rest = stream.read()
        start_response("200 OK", [])
        return [str(len(first) + len(rest)).encode()]

    client = Client(to_asgi(app, input_buffer=1))
    response = await client.request("POST", body=[b"0123456789"] * 100)
    assert response.body == b"1000"
    assert seen_when_first_read[0] <= 4  # buffer of 1 + the one in the pump's hands


async def test_unread_body_does_not_block_the_response() -> None:
    """An app that ignores a large body still answers, and the rest is drained."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ignored"]

    client = Client(to_asgi(app, input_buffer=1))
    response = await client.request("POST", body=[b"x" * 100] * 50)
    assert response.body == b"ignored"
    assert response.complete


async def test_wsgi_input_reads_eof_after_a_disconnect() -> None:
    """A client that leaves mid-upload: the app's read sees EOF instead of hanging."""
    got: list[bytes] = []
    client: Client

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        stream = environ["wsgi.input"]
        got.append(stream.read(3))
        anyio.from_thread.run_sync(client.disconnect)
        got.append(stream.read())
        start_response("200 OK", [])
        return [b""]

    client = Client(to_asgi(app, input_buffer=0))

    async def endless() -> None:
        await client.request("POST", body=[b"abc"] + [b"more"] * 10_000)

    with anyio.fail_after(10):
        await endless()
    assert got[0] == b"abc"
    assert len(got[1]) < 40_000


# -- close() ---------------------------------------------------------------------------


async def test_close_called_once_on_normal_end_for_validated_app() -> None:
    """The wsgiref validator fails the test if close() is skipped or doubled."""
    body = Counted([b"a", b"b"])

    def app(environ: Environ, start_response: StartResponse) -> Counted:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    response = await request(to_asgi(validator(app)))
    assert response.body == b"ab"
    assert body.closed == 1


async def test_client_disconnect_stops_a_sync_generator_and_closes_it() -> None:
    """An endless generator stops at its next chunk once the client left; close() once."""
    closed: list[bool] = []
    produced = threading.Semaphore(0)

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])

        def gen() -> Iterator[bytes]:
            try:
                for i in range(100_000):
                    produced.release()
                    yield b"%d\n" % i
            finally:
                closed.append(True)

        return gen()

    client = Client(to_asgi(app))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.request)
        await client.first_body.wait()
        client.disconnect()
    assert closed == [True]
    assert not client.response.complete
    assert len(client.response.chunks) < 100_000


async def test_websocket_scope_is_refused_cleanly() -> None:
    """A WSGI app can't speak websockets: the handshake is closed, nothing crashes."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    app = to_asgi(echo_environ([]))
    await app({"type": "websocket", "path": "/", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1000}]


async def test_options_are_validated() -> None:
    """Bad options fail at construction with a clear message."""
    with pytest.raises(ValueError, match="workers"):
        WSGIMiddleware(echo_environ([]), workers=0)
    with pytest.raises(ValueError, match="input_buffer"):
        WSGIMiddleware(echo_environ([]), input_buffer=-1)
    with pytest.raises(TypeError, match="WSGI callable"):
        WSGIMiddleware("not an app")  # type: ignore[arg-type]


async def test_wsgi_calls_run_on_a_bounded_pool_in_one_thread_each() -> None:
    """At most ``workers`` WSGI calls run at once; a call's iteration stays on its thread."""
    workers = 3
    lock = threading.Lock()
    running = 0
    peak = 0
    same_thread: list[bool] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        nonlocal running, peak
        call_thread = threading.get_ident()
        with lock:
            running += 1
            peak = max(peak, running)
        start_response("200 OK", [])
        try:
            for _ in range(3):
                anyio.from_thread.run(anyio.sleep, 0.005)
                same_thread.append(threading.get_ident() == call_thread)
                yield b"x"
        finally:
            with lock:
                running -= 1

    adapter = to_asgi(app, workers=workers)
    responses = []

    async def one() -> None:
        responses.append(await request(adapter))

    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(one)
    assert all(r.body == b"xxx" for r in responses)
    assert len(responses) == 12
    assert peak <= workers
    assert all(same_thread)


async def test_a_queued_wsgi_call_starts_without_waiting_for_the_loop() -> None:
    """With the pool full, the next call starts on the thread that just finished, even
    while the loop is busy: queued requests don't each wait a loop round-trip for a
    thread (what made Flask's streams scale worse than native ones)."""
    first_started = threading.Event()
    release_first = threading.Event()
    second_started = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        if environ["PATH_INFO"] == "/first":
            first_started.set()
            release_first.wait(10)
            # Fail before any byte: the thread is free without the loop's help (a
            # response would need the loop to send it).
            raise RuntimeError("first done")
        else:
            second_started.set()
        start_response("200 OK", [])
        return [b"ok"]

    adapter = to_asgi(app, workers=1)
    responses: list[Any] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _append(responses, request(adapter, "GET", "/first")))
        assert await anyio.to_thread.run_sync(first_started.wait, 10)
        tg.start_soon(lambda: _append(responses, request(adapter, "GET", "/second")))
        for _ in range(20):  # let the second request reach the pool's queue
            await anyio.lowlevel.checkpoint()
        # Block the loop itself: only the pool can start the second call now.
        release_first.set()
        assert second_started.wait(10), "the queued call waited for the loop"
    assert sorted(r.status for r in responses) == [200, 500]


async def test_a_body_that_came_with_the_request_is_read_without_the_loop() -> None:
    """A body whose one message arrived with the request (most POSTs) is in wsgi.input
    already: the app reads it while the loop is busy, holding its thread no longer."""
    entered = threading.Event()
    go = threading.Event()
    done_reading = threading.Event()
    got: list[bytes] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        entered.set()
        go.wait(10)
        got.append(environ["wsgi.input"].read())
        done_reading.set()
        start_response("200 OK", [])
        return [b"ok"]

    responses: list[Any] = []
    adapter = to_asgi(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _append(responses, request(adapter, "POST", body=[b'{"a": 1}'])))
        assert await anyio.to_thread.run_sync(entered.wait, 10)
        go.set()
        # The loop is blocked here: a read that needed it could not finish.
        assert done_reading.wait(10), "wsgi.input went back to the loop for a body it had"
    assert got == [b'{"a": 1}']
    assert responses[0].status == 200


async def _append(into: list[Any], awaitable: Any) -> None:
    into.append(await awaitable)


async def test_contextvars_set_in_the_app_are_seen_by_its_iteration() -> None:
    """Flask's stream_with_context works: the call and its body share one context."""
    from flask import Flask, Response, stream_with_context
    from flask import request as flask_request

    flask_app = Flask(__name__)

    @flask_app.get("/stream")
    def stream() -> Response:
        def gen() -> Iterator[str]:
            for i in range(3):
                yield f"{flask_request.args['name']}{i};"

        return Response(stream_with_context(gen()))

    response = await request(to_asgi(flask_app), "GET", "/stream", query=b"name=n")
    assert response.body == b"n0;n1;n2;"
    assert response.error is None


async def test_body_longer_than_content_length_is_clamped_and_iteration_stops() -> None:
    """PEP 3333: never send more than Content-Length, and stop iterating once it is out."""
    pulled: list[int] = []
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            for i, chunk in enumerate([b"0123", b"45", b"6789", b"never"]):
                pulled.append(i)
                yield chunk

        def close(self) -> None:
            closed.append(True)

    def app(environ: Environ, start_response: StartResponse) -> Body:
        start_response("200 OK", [("Content-Length", "8")])
        return Body()

    response = await request(to_asgi(app))
    assert response.body == b"01234567"
    assert response.complete
    assert pulled == [0, 1, 2]
    assert closed == [True]


async def test_headers_given_as_lists_are_accepted() -> None:
    """Header pairs as two-item lists (as asgiref and werkzeug accept) work too."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [["X-Colour", "Blue"]])  # type: ignore[list-item]
        return [b"ok"]

    response = await request(to_asgi(app))
    assert (b"x-colour", b"Blue") in response.headers
