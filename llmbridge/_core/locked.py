"""``locked(obj)``: serialise every call into an object that is not thread-safe."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

__all__ = ["Locked", "locked"]

T = TypeVar("T")


class Locked(Generic[T]):
    """A proxy that lets one thread at a time into the wrapped object.

    Every method call takes the proxy's lock for the call's duration. A call that returns
    a generator (``llama_cpp.Llama.create_completion(stream=True)``) keeps the lock until
    the generator is exhausted or closed, because the object's state belongs to that
    generator until then: every other caller waits for the whole stream. ``with proxy as
    obj:`` holds the lock across several calls. Attributes that are not callable are read
    without the lock.
    """

    __slots__ = ("_lock", "_obj")

    def __init__(self, obj: T, lock: threading.Lock | None = None) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_lock", lock if lock is not None else threading.Lock())

    _lock: threading.Lock
    _obj: T

    @property
    def lock(self) -> threading.Lock:
        """The lock every call takes."""
        return self._lock

    @property
    def wrapped(self) -> T:
        """The wrapped object. Touching it directly bypasses the lock."""
        return self._obj

    def __repr__(self) -> str:
        return f"locked({self._obj!r})"

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr
        return self._guard(attr)

    def __setattr__(self, name: str, value: Any) -> None:
        with self._lock:
            setattr(self._obj, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(self._obj)(*args, **kwargs)  # type: ignore[arg-type]

    def _guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        lock = self._lock

        def call(*args: Any, **kwargs: Any) -> Any:
            lock.acquire()
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                lock.release()
                raise
            if isinstance(result, Iterator) and hasattr(result, "throw"):
                return _HeldGenerator(result, lock)
            lock.release()
            return result

        call.__name__ = getattr(fn, "__name__", "call")
        call.__doc__ = getattr(fn, "__doc__", None)
        return call

    def __enter__(self) -> T:
        self._lock.acquire()
        return self._obj

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()


class _HeldGenerator(Iterator[Any]):
    """Iterates a generator while its object's lock is held; releases it exactly once."""

    __slots__ = ("_gen", "_lock")

    def __init__(self, gen: Iterator[Any], lock: threading.Lock | None) -> None:
        self._gen = gen
        self._lock = lock

    def __next__(self) -> Any:
        try:
            return next(self._gen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            try:
                getattr(self._gen, "close")()  # noqa: B009
            finally:
                lock.release()

    def __del__(self) -> None:
        self.close()


def locked(obj: T, *, lock: threading.Lock | None = None) -> Locked[T]:
    """Wrap ``obj`` so that every call into it is serialised by one lock.

    Use it for run-to-completion calls into an object that is not thread-safe, such as
    ``llama_cpp.Llama``: Flask request threads then take turns instead of corrupting its
    state. For *streaming*, prefer an :class:`~llmbridge.Engine`: a locked object is held
    by one stream from its first token to its last, so every other request waits for the
    whole stream (head-of-line blocking), and nobody else's tokens are produced until it
    ends. The engine interleaves many streams, batches them when the backend can, and
    cancels a stream whose client left.

    >>> import threading
    >>> counter = locked([])
    >>> counter.append(1)
    >>> counter.wrapped
    [1]
    """
    return Locked(obj, lock)
