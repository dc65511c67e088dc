"""Apps the OpenAI tests serve with real servers in a subprocess.

``OPENAI_APP`` picks the app: ``flask`` / ``quart`` (the blueprints over a simulated
engine), or ``chain`` (Flask over an :class:`OpenAIBackend` whose upstream is
``UPSTREAM_URL``).
"""

from __future__ import annotations

import os
from typing import Any

from llmbridge import Engine
from llmbridge.openai import Settings, flask_blueprint, quart_blueprint
from llmbridge.testing import simulated_engine

SETTINGS = Settings(models=("sim", "sim-2"), max_input_chars=4000, max_tokens_limit=512)


def _simulated() -> Any:
    return simulated_engine(
        step_time=float(os.environ.get("SIM_STEP_TIME", "0.002")), max_new_tokens=16
    )


def build(kind: str) -> Any:
    """The app named ``kind``."""
    if kind == "flask":
        from flask import Flask

        app = Flask(__name__)
        app.register_blueprint(flask_blueprint(_simulated(), settings=SETTINGS))
        return app
    if kind == "quart":
        from quart import Quart

        qapp = Quart(__name__)
        qapp.register_blueprint(quart_blueprint(_simulated(), settings=SETTINGS))
        return qapp
    if kind == "chain":
        from flask import Flask

        from llmbridge.backends import OpenAIBackend

        backend = OpenAIBackend(os.environ["UPSTREAM_URL"], api_key="sk-test", model="sim")
        app = Flask(__name__)
        app.register_blueprint(flask_blueprint(Engine(backend), settings=SETTINGS))
        return app
    raise ValueError(f"unknown OPENAI_APP {kind!r}")


app = build(os.environ.get("OPENAI_APP", "flask"))

if __name__ == "__main__":
    from werkzeug.serving import run_simple

    run_simple("127.0.0.1", int(os.environ["PORT"]), app, threaded=True)
