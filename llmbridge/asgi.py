"""Serve a Flask (any WSGI) app from uvicorn, hypercorn or gunicorn's uvicorn worker.

``to_asgi(app, **options)`` (or the class, ``WSGIMiddleware(app, **options)``, a drop-in
for ``a2wsgi.WSGIMiddleware`` and ``asgiref.wsgi.WsgiToAsgi``) turns a WSGI app into an
ASGI 3 app with a bounded thread pool for WSGI calls, streamed request and response
bodies, ``close()`` always called once, disconnects that cancel engine jobs, and streams
(``bridge.sse(...)``) that run on the event loop instead of holding a thread. Its
lifespan starts the engines, and on SIGTERM it stops admitting (503), lets streams finish
up to ``drain_timeout``, then ends the rest with a final ``event: error``.

>>> from flask import Flask                                    # doctest: +SKIP
>>> from llmbridge.asgi import to_asgi                         # doctest: +SKIP
>>> app = to_asgi(Flask(__name__), workers=8)                  # doctest: +SKIP

Then ``uvicorn module:app`` or ``gunicorn -k uvicorn_worker.UvicornWorker module:app``.
"""

from __future__ import annotations

from ._web.asgi import ClientDisconnected, WSGIMiddleware, build_environ, to_asgi
from ._web.body import ASYNC_BODY_KEY

__all__ = ["ASYNC_BODY_KEY", "ClientDisconnected", "WSGIMiddleware", "build_environ", "to_asgi"]
