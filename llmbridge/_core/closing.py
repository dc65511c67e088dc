"""The ``with`` / ``async with`` forms shared by everything that has ``close``/``aclose``."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing:
    """Mixin: ``with obj:`` calls ``close()`` on exit, ``async with obj:`` ``aclose()``."""

    __slots__ = ()

    def close(self) -> None:
        """Release what the object holds (blocking form)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release what the object holds (async form)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
