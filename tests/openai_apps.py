"""Apps the OpenAI tests serve with real servers in a subprocess.

``OPENAI_APP`` picks the app: ``flask`` / ``quart`` (the blueprints over a simulated
engine), or ``chain`` (Flask over an :class:`OpenAIBackend` whose upstream is
``UPSTREAM_URL``). ``asgi`` is the Flask app under ``llmbridge.asgi`` (for uvicorn).

Knobs, all optional: ``OPENAI_BACKEND=never`` (a backend that never answers),
``SIM_STEP_TIME``, ``SIM_MAX_TOKENS``, ``SIM_BATCH`` (the simulated engine),
``OPENAI_START_TIMEOUT`` (the routes' first-output deadline), ``DRAIN_TIMEOUT``,
``QUART_BRIDGE=1`` (a QuartBridge on the Quart app too), ``ASGI_WORKERS`` (the adapter's
threads).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from llmbridge import Engine
from llmbridge.asgi import to_asgi
from llmbridge.openai import Settings, flask_blueprint, quart_blueprint
from llmbridge.testing import simulated_engine

SETTINGS = Settings(models=("sim", "sim-2"), max_input_chars=4000, max_tokens_limit=512)


async def never(prompt: str, **params: Any) -> str:
    """A backend that never answers (until cancelled)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _engine() -> Any:
    if os.environ.get("OPENAI_BACKEND") == "never":
        return Engine(never)
    return simulated_engine(
        step_time=float(os.environ.get("SIM_STEP_TIME", "0.002")),
        max_new_tokens=int(os.environ.get("SIM_MAX_TOKENS", "16")),
        max_batch_size=int(os.environ.get("SIM_BATCH", "64")),
    )


def _options() -> dict[str, Any]:
    options: dict[str, Any] = {"settings": SETTINGS, "auth": None}  # keys: test_auth_servers
    if "OPENAI_START_TIMEOUT" in os.environ:
        options["start_timeout"] = float(os.environ["OPENAI_START_TIMEOUT"])
    return options


DRAIN_TIMEOUT = float(os.environ.get("DRAIN_TIMEOUT", "10"))
ENGINE = _engine()


def build(kind: str) -> Any:
    """The app named ``kind``."""
    if kind == "flask":
        from flask import Flask

        app = Flask(__name__)
        app.register_blueprint(flask_blueprint(ENGINE, **_options()))
        return app
    if kind == "quart":
        from quart import Quart

        qapp = Quart(__name__)
        bp = quart_blueprint(ENGINE, drain_timeout=DRAIN_TIMEOUT, **_options())
        qapp.register_blueprint(bp)
        if os.environ.get("QUART_BRIDGE") == "1":  # the bridge's drain counts /v1 streams
            from llmbridge.quart import QuartBridge

            QuartBridge(qapp, engine=ENGINE, drain_timeout=DRAIN_TIMEOUT)
        return qapp
    if kind == "chain":
        from flask import Flask

        from llmbridge.backends import OpenAIBackend

        backend = OpenAIBackend(os.environ["UPSTREAM_URL"], api_key="sk-test", model="sim")
        app = Flask(__name__)
        app.register_blueprint(flask_blueprint(Engine(backend), auth=None, settings=SETTINGS))
        return app
    raise ValueError(f"unknown OPENAI_APP {kind!r}")


KIND = os.environ.get("OPENAI_APP", "flask")
app = build(KIND)
#: The Flask app under llmbridge.asgi: ``uvicorn openai_apps:asgi``. No ``engines=``:
#: the adapter's drain must end /v1 streams it pumps without knowing their engine.
WORKERS = int(os.environ.get("ASGI_WORKERS", "8"))
asgi = to_asgi(app, drain_timeout=DRAIN_TIMEOUT, workers=WORKERS) if KIND != "quart" else None

if __name__ == "__main__":
    from werkzeug.serving import run_simple

    run_simple("127.0.0.1", int(os.environ["PORT"]), app, threaded=True)
