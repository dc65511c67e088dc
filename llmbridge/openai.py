"""An OpenAI-compatible HTTP surface over any engine, for Flask and for Quart.

Point the client your team already uses, the official ``openai`` SDK, at a model that an
:class:`~llmbridge.Engine` drives::

    from flask import Flask
    from llmbridge.openai import ApiKeys, flask_blueprint

    app = Flask(__name__)
    app.register_blueprint(flask_blueprint(engine, auth=ApiKeys.from_env("LLMBRIDGE_API_KEYS")))
    # openai.OpenAI(base_url="http://host:port/v1", api_key=<one of the keys>)

``auth=`` is required: :class:`ApiKeys` (in code, :meth:`ApiKeys.from_env`,
:meth:`ApiKeys.from_file`, re-read when the file changes), a hook
``authenticate(request) -> Principal | str | None``, or ``None`` to serve openly. A
missing or unknown key is a 401 (``invalid_api_key``, ``WWW-Authenticate: Bearer``). The
caller's :class:`Principal` is the rate-limit key and cache namespace of a
:class:`~llmbridge.policies.Pipeline` and carries its own :class:`KeyLimits`
(requests/min, tokens/min, tokens/day: 429 with ``Retry-After`` when spent).

Both blueprints serve ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` and ``GET /v1/models/{id}``, streaming (``"stream": true``: SSE ending
with ``data: [DONE]``, usage in a last chunk when ``stream_options.include_usage``) and
not. Bad requests get a 400 (404 for unknown URLs, 405, 413 past
``Settings.max_body_bytes``) with OpenAI's error shape ``{"error": {"message", "type",
"param", "code"}}``; llmbridge errors keep their status (429, 503, 502, 504).

A chat request is rendered to a prompt by ``Settings.chat_template`` (default
:func:`render_messages`) and submitted as ``submit(prompt, messages=..., max_new_tokens=...,
temperature=..., top_p=..., stop=[...], seed=...)``, passing only what the client sent.

:func:`flask_blueprint` needs ``llmbridge[flask]``, :func:`quart_blueprint` needs
``llmbridge[quart]``; each imports its framework only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._core.engine import Submitter
from ._openai.wire import InvalidRequest, Settings, render_messages
from ._policies.budget import KeyLimits
from ._web.auth import ApiKeys, Principal

if TYPE_CHECKING:
    import flask
    import quart

__all__ = [
    "ApiKeys",
    "InvalidRequest",
    "KeyLimits",
    "Principal",
    "Settings",
    "flask_blueprint",
    "quart_blueprint",
    "render_messages",
]


def flask_blueprint(submitter: Submitter, **options: Any) -> flask.Blueprint:
    """A Flask blueprint with the OpenAI routes over ``submitter``, under ``/v1``.

    Options (keyword-only): ``auth`` (required: :class:`ApiKeys`, a hook
    ``authenticate(flask.request) -> Principal | str | None``, or ``None`` to serve
    without keys, with a warning once a non-loopback address serves), ``open_models``
    (``True`` leaves ``/v1/models`` open), ``settings`` (a :class:`Settings`: model names, chat
    template, input and body limits), ``name``, ``url_prefix``, ``heartbeat`` (seconds of
    silence before an SSE comment keeps proxies from closing a slow stream; ``None``
    disables), ``start_timeout`` (60 s to the first output, then 504; ``None``: none),
    ``timeout`` (a whole non-streamed answer's deadline after its first output).

    Views block their request thread, never the engine; under ``llmbridge.asgi`` a
    streamed answer holds no thread (the adapter pumps it on its loop, and drains it on
    SIGTERM). Streamed bodies cancel their request when the server closes them (client
    gone). Every error, unknown URLs under the prefix included, is OpenAI-shaped JSON.
    Raises ``TypeError`` without ``auth=``, ImportError without Flask.
    """
    try:
        from ._openai.flask_routes import flask_blueprint as build
    except ModuleNotFoundError as exc:
        raise _needs("flask_blueprint", "Flask", "flask", exc) from exc
    return build(submitter, **options)


def quart_blueprint(submitter: Submitter, **options: Any) -> quart.Blueprint:
    """A Quart blueprint with the OpenAI routes over ``submitter``, under ``/v1``.

    Same options as :func:`flask_blueprint` (the ``auth`` hook may be ``async`` and gets
    ``quart.request``), and ``drain_timeout`` (10 s),
    ``retry_after`` (5 s) and ``handle_signals`` (True): on SIGTERM/SIGINT new requests
    get a 503 and open streams end, by ``drain_timeout``, with a final error event (an
    app's :class:`~llmbridge.quart.QuartBridge` drains them with its own settings).
    Views await the engine and never block the event loop; a client that disconnects
    cancels its request. Raises ImportError without Quart.
    """
    try:
        from ._openai.quart_routes import quart_blueprint as build
    except ModuleNotFoundError as exc:
        raise _needs("quart_blueprint", "Quart", "quart", exc) from exc
    return build(submitter, **options)


def _needs(function: str, framework: str, extra: str, exc: ModuleNotFoundError) -> ImportError:
    return ImportError(
        f"llmbridge.openai.{function} needs {framework} (no module {exc.name!r}): "
        f'pip install "llmbridge[{extra}]"'
    )
