"""The Flask example app (examples/flask_app) as an ASGI app, for uvicorn and gunicorn.

    uvicorn examples.asgi_app:app --host 127.0.0.1 --port 8000
    gunicorn -c examples/gunicorn.conf.py examples.asgi_app:app

``llmbridge.asgi`` finds the app's engine through ``app.extensions["llmbridge"]``: it
starts it in each worker at lifespan startup and drains it on SIGTERM.
"""

from __future__ import annotations

import logging
import os

from examples.flask_app import create_app
from llmbridge.asgi import to_asgi

flask_app = create_app()


def log_shutdown() -> None:
    logging.getLogger("llmbridge").warning("worker %d: engines closed, bye", os.getpid())


app = to_asgi(
    flask_app,
    workers=int(os.environ.get("LLMBRIDGE_WORKERS", "8")),
    drain_timeout=float(os.environ.get("LLMBRIDGE_DRAIN_TIMEOUT", "10")),
    on_shutdown=log_shutdown,
)
