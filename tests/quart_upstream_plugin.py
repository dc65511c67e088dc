"""A pytest plugin that installs QuartBridge on every Quart app a test suite creates.

Used by ``.ci/quart_upstream.sh`` to run Quart's own test suite with the bridge installed:
the outcome must be the same as without it. Each app gets its own simulated engine
(started by the app's ``before_serving``, closed by its ``after_serving``) and the
bridge's default options, signal handling included.
"""

from __future__ import annotations

from typing import Any

import pytest
import quart

from llmbridge.quart import QuartBridge
from llmbridge.testing import simulated_engine

_original_init = quart.Quart.__init__
_installed = 0


def _init(self: quart.Quart, *args: Any, **kwargs: Any) -> None:
    global _installed
    _original_init(self, *args, **kwargs)
    QuartBridge(self, engine=simulated_engine(step_time=0.0))
    _installed += 1


quart.Quart.__init__ = _init  # type: ignore[method-assign]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"llmbridge: QuartBridge installed on {_installed} apps")
