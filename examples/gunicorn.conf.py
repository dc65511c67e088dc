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

# One model for all workers: with LLMBRIDGE_ENGINE_TARGET=module:engine set, gunicorn
# starts that engine in a process of its own before forking the workers, and every
# worker's `shared_engine(factory)` submits to it over a private Unix socket (mode
# 0600) instead of loading its own copy. It is stopped after the workers drained, or
# when the arbiter dies (then the workers stop too).
# docs/howto/shared_engine.md explains it.
import os  # noqa: E402

if os.environ.get("LLMBRIDGE_ENGINE_TARGET"):
    from llmbridge.gunicorn import EngineProcess

    engine_process = EngineProcess(os.environ["LLMBRIDGE_ENGINE_TARGET"])
    on_starting = engine_process.on_starting
    on_exit = engine_process.on_exit
    post_fork = engine_process.post_fork  # a worker outlives no arbiter (SIGKILL)
