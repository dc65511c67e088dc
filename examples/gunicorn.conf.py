"""gunicorn settings for the llmbridge examples: ``gunicorn -c examples/gunicorn.conf.py
examples.asgi_app:app`` (or ``examples.quart_app:app``)."""

# uvicorn's own ``uvicorn.workers`` is deprecated: the worker lives in uvicorn-worker.
worker_class = "uvicorn_worker.UvicornWorker"
workers = 2
bind = "127.0.0.1:8000"
# Import the app once in the master; each worker starts its own engine after the fork
# (engines start lazily, in the process that uses them).
preload_app = True
# SIGTERM: the app stops admitting, lets streams run up to LLMBRIDGE_DRAIN_TIMEOUT
# (10 s), then ends them with a final event. Leave a few seconds of margin.
graceful_timeout = 20
# A long stream is not a stuck worker: the uvicorn worker heartbeats from its loop.
timeout = 60
keepalive = 5
