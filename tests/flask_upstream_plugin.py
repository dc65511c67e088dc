"""A pytest plugin that installs FlaskBridge on every Flask app a test suite creates.

Used by ``.ci/flask_upstream.sh`` to run Flask's own test suite with the bridge installed:
the outcome must be the same as without it.
"""

from __future__ import annotations

from typing import Any

import flask
import pytest

from llmbridge.flask import FlaskBridge
from llmbridge.testing import simulated_engine

_ENGINE = simulated_engine(step_time=0.0)
_original_init = flask.Flask.__init__
_installed = 0


def _init(self: flask.Flask, *args: Any, **kwargs: Any) -> None:
    global _installed
    _original_init(self, *args, **kwargs)
    FlaskBridge(self, engine=_ENGINE)
    _installed += 1


flask.Flask.__init__ = _init  # type: ignore[method-assign]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"llmbridge: FlaskBridge installed on {_installed} apps")
