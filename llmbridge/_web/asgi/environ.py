"""The PEP 3333 environ of an ASGI HTTP scope: paths, mount prefixes, request headers.

Pure functions: no threads, no loop. The header loop is linear in the number of headers
(values are collected per name and joined once) and a single name may repeat at most
``duplicate_header_limit`` times, as in asgiref's ``WsgiToAsgi``.
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from ..._exceptions import BadRequest

__all__ = ["DEFAULT_DUPLICATE_HEADER_LIMIT", "TooManyHeaders", "build_environ", "mount_prefix"]

Scope = MutableMapping[str, Any]

#: asgiref's default: one header name may appear this many times in a request.
DEFAULT_DUPLICATE_HEADER_LIMIT = 100


class TooManyHeaders(BadRequest):
    """A request header repeats more often than ``duplicate_header_limit`` allows."""

    status = 431
    title = "Request header fields too large"


def mount_prefix(value: str | None) -> str:
    """Normalise a mount prefix (the ``script_name`` option, ``$SCRIPT_NAME``): ``""``
    for none, else one leading ``/`` and no trailing one. Raises ``ValueError`` for a
    prefix that isn't a path."""
    if not value or value == "/":
        return ""
    if not isinstance(value, str) or not value.startswith("/") or "?" in value:
        raise ValueError(f"script_name must be a path like '/api', got {value!r}")
    return value.rstrip("/")


def _strip(path: str, prefix: str) -> str:
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix) :]
    return path


def build_environ(
    scope: Scope,
    wsgi_input: Any,
    *,
    script_name: str = "",
    duplicate_header_limit: int | None = DEFAULT_DUPLICATE_HEADER_LIMIT,
) -> dict[str, Any]:
    """The PEP 3333 environ of an ASGI HTTP ``scope`` (without server extensions).

    ``SCRIPT_NAME`` is the scope's ``root_path`` and ``PATH_INFO`` the path below it (a
    server such as ``uvicorn --root-path /api`` puts the root in front of the path: a
    proxy that strips the prefix). ``script_name`` (normalised by :func:`mount_prefix`),
    when set, is the mount prefix instead, for a proxy that does *not* strip it:
    ``SCRIPT_NAME`` becomes ``script_name`` and a path under it loses the prefix. Raises
    :class:`TooManyHeaders` (431) when one header name repeats more than
    ``duplicate_header_limit`` times (``None`` or 0: no limit). Never blocks.
    """
    root = scope.get("root_path", "")
    raw_path = scope.get("raw_path")
    root_native = root.encode("utf-8").decode("latin-1")
    if raw_path:
        # The raw target keeps bytes that are not UTF-8: WSGI wants them as latin-1.
        path = unquote_to_bytes(raw_path.split(b"?", 1)[0]).decode("latin-1")
    else:
        path = scope["path"].encode("utf-8").decode("latin-1")
    path = _strip(path, root_native)
    if script_name:
        prefix = script_name.encode("utf-8").decode("latin-1")
        path = _strip(path, prefix)
        root_native = prefix
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root_native,
        "PATH_INFO": path,
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": wsgi_input,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        # The server has de-chunked the body and signals its end: reading to EOF is safe.
        "wsgi.input_terminated": True,
        "asgi.scope": scope,
    }
    environ.update(_header_items(scope.get("headers", ()), duplicate_header_limit))
    server = scope.get("server")
    if server:
        environ["SERVER_NAME"] = str(server[0])
        # A unix socket has no port: "0", as asgiref and a2wsgi say.
        environ["SERVER_PORT"] = str(server[1]) if server[1] is not None else "0"
    else:
        host = environ.get("HTTP_HOST", "")
        name, colon, port = host.rpartition(":")
        if not colon or "]" in port:  # no port, or the colon was inside an IPv6 literal
            name, port = host, ""
        environ["SERVER_NAME"] = name or "localhost"
        environ["SERVER_PORT"] = port or ("443" if environ["wsgi.url_scheme"] == "https" else "80")
    client = scope.get("client")
    if client:
        environ["REMOTE_ADDR"] = str(client[0])
        environ["REMOTE_PORT"] = str(client[1])
    return environ


def _header_items(headers: Any, limit: int | None) -> dict[str, str]:
    # Collect, then join once: joining as we go copies the value on every duplicate
    # (quadratic: 50,000 duplicates took seconds of loop time).
    values: dict[str, list[str]] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1")
        if "_" in name:
            # ``X_Forwarded_For`` would collide with ``X-Forwarded-For``: drop it, as
            # gunicorn, nginx and Apache do.
            continue
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        seen = values.get(key)
        if seen is None:
            values[key] = [raw_value.decode("latin-1")]
            continue
        if limit and len(seen) >= limit:
            raise TooManyHeaders(f"the {name} header repeats more than {limit} times")
        seen.append(raw_value.decode("latin-1"))
    return {
        key: ("; " if key == "HTTP_COOKIE" else ",").join(parts) for key, parts in values.items()
    }
