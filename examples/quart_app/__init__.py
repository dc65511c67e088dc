"""The Quart version of the Flask example app: ``app`` (see ``app.py``)."""

from __future__ import annotations

from .app import app, bridge

__all__ = ["app", "bridge"]
