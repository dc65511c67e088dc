"""The WSGI → ASGI adapter (``llmbridge.asgi``), in parts: ``environ`` (scope → PEP 3333
environ), ``input`` (``wsgi.input`` and the loop portal), ``response`` (start_response,
write, problem answers) and ``adapter`` (:class:`WSGIMiddleware`: pool, lifespan,
stream pumping)."""

from __future__ import annotations

from .adapter import WSGIMiddleware, to_asgi
from .environ import TooManyHeaders, build_environ
from .response import ClientDisconnected, send_problem

__all__ = [
    "ClientDisconnected",
    "TooManyHeaders",
    "WSGIMiddleware",
    "build_environ",
    "send_problem",
    "to_asgi",
]
