"""The llmbridge Flask example app: ``create_app()`` builds it (see ``app.py``)."""

from __future__ import annotations

from .app import bridge, create_app

__all__ = ["bridge", "create_app"]
