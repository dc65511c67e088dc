"""Policies between callers and an engine: the Pipeline and what it composes."""
