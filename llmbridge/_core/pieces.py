"""What a callable backend returns or yields, read as text plus how it ended.

A :class:`~llmbridge.backends.CallableBackend` callable may hand back plain ``str``
chunks, or objects that also say how the answer ended, so that a callable wrapping
another client reports ``finish_reason="length"`` when ``max_tokens`` cut the answer,
and the prompt's token count when the client knows it:

- an OpenAI SDK response or stream chunk (``ChatCompletion``, ``ChatCompletionChunk``,
  ``Completion``), or the same as a dict: the first choice's text
  (``message.content``, ``delta.content`` or ``text``), its ``finish_reason``, and
  ``usage.prompt_tokens`` / ``usage.completion_tokens``;
- any other object or dict with any of ``text``, ``finish_reason``, ``prompt_tokens``,
  ``completion_tokens`` (an :class:`~llmbridge.Completion` is one).

A plain ``str`` says nothing about the end: the request finishes with ``"stop"`` and
the prompt tokens are absent (0), since the engine can't know what cut the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["Ending", "is_piece", "read_piece"]

_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


class Ending:
    """How the answer ended, as far as the pieces said (the last word wins)."""

    __slots__ = ("completion_tokens", "finish_reason", "prompt_tokens")

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    @property
    def reported(self) -> bool:
        """True once a piece said anything about the end or the usage."""
        return (
            self.finish_reason is not None
            or self.prompt_tokens is not None
            or self.completion_tokens is not None
        )


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_FIELDS = ("choices", "text", "finish_reason", "prompt_tokens", "completion_tokens", "usage")


def is_piece(value: Any) -> bool:
    """Whether ``value`` is one piece (a ``str``, or an object or dict carrying the
    fields above) rather than an iterable of pieces. A pydantic model such as the SDK's
    ``ChatCompletion`` is iterable too: its fields decide."""
    if isinstance(value, str | Mapping):
        return True
    return any(getattr(value, name, None) is not None for name in _FIELDS)


def read_piece(piece: Any, ending: Ending) -> str:
    """The text of ``piece``; what it says about the end goes into ``ending``.

    Raises ``TypeError`` for a piece that is neither ``str`` nor an object or dict
    carrying any of the fields above.
    """
    if isinstance(piece, str):
        return piece
    usage = _get(piece, "usage")
    choices = _get(piece, "choices")
    if isinstance(choices, list | tuple):
        text: Any = None
        first = next((c for c in choices if (_int(_get(c, "index")) or 0) == 0), None)
        if first is not None:
            inner = _get(first, "message") or _get(first, "delta")
            text = _get(inner, "content") if inner is not None else _get(first, "text")
            _note_reason(ending, _get(first, "finish_reason"))
    elif any(
        _get(piece, name) is not None
        for name in ("text", "finish_reason", "prompt_tokens", "completion_tokens")
    ):
        text = _get(piece, "text")
        _note_reason(ending, _get(piece, "finish_reason"))
        usage = piece
    else:
        raise TypeError(
            f"chunks must be str, or carry text / finish_reason / usage; got {type(piece).__name__}"
        )
    if usage is not None:
        prompt, completion = (
            _int(_get(usage, "prompt_tokens")),
            _int(_get(usage, "completion_tokens")),
        )
        if prompt is not None:
            ending.prompt_tokens = prompt
        if completion is not None:
            ending.completion_tokens = completion
    if text is not None and not isinstance(text, str):
        raise TypeError(f"a chunk's text must be str, got {type(text).__name__}")
    return text or ""


def _note_reason(ending: Ending, reason: Any) -> None:
    if isinstance(reason, str) and reason:
        ending.finish_reason = reason if reason in _REASONS else "stop"
