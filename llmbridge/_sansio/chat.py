"""Chat messages as one prompt, without I/O: the default chat template.

Shared by :meth:`llmbridge.Engine.chat` (a local backend gets the rendered prompt beside
the messages) and the ``/v1`` routes, so both render the same messages alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._exceptions import BadRequest

__all__ = ["chat_messages", "render_messages"]


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as a list of plain dicts, each with a string ``role``. Raises
    :class:`~llmbridge.BadRequest` for anything else (a bare string, an empty list)."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise BadRequest("messages must be a non-empty list of {'role', 'content'} dicts")
    clean = []
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise BadRequest("each message must be a dict with a string 'role'")
        clean.append(dict(message))
    return clean


def render_messages(messages: Sequence[Mapping[str, Any]]) -> str:
    """The default chat template: each message as ``<|role|>\\ncontent\\n``, then
    ``<|assistant|>\\n`` to cue the reply. Pure and deterministic, so an upstream that
    renders the same messages gets the same prompt."""
    parts = [f"<|{m['role']}|>\n{_content_text(m.get('content'))}\n" for m in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # A list of content parts: only text parts carry text for a text model.
    return "".join(part["text"] for part in content if part.get("type") == "text")
