"""One upstream's connections as several small pools, so a request's cost does not
grow with the number of connections.

httpcore's ``AsyncConnectionPool`` walks every connection it holds on each request it
assigns and each response it releases (``has_expired``: a ``getpeername`` and a ``poll``
per idle connection, and for each idle one a count over the whole pool again). With 64
or more requests in flight through one pool, that walk was most of the engine thread's
time (59% to 70% of its samples under 64 concurrent whole answers; see
docs/benchmarks.md). Several pools of at most ``connections_per_pool`` connections each
bound the walk, whatever the concurrency; the total stays ``max_connections``.

Engine loop only (no locks): :meth:`ShardedPool.checkout` and
:meth:`ShardedPool.checkin` run on the one thread that owns the clients. The counters
are plain ints that any thread may read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["Shard", "ShardedPool", "split"]


class _Closable(Protocol):
    async def aclose(self) -> None: ...


C = TypeVar("C", bound=_Closable)


def split(total: int, parts: int) -> list[int]:
    """``total`` divided into ``parts`` near-equal ints, larger ones first (they sum to
    ``total``): ``split(10, 3) == [4, 3, 3]``."""
    whole, rest = divmod(total, parts)
    return [whole + (i < rest) for i in range(parts)]


class Shard(Generic[C]):
    """One small pool: its client, its connection limit and the requests on it now."""

    __slots__ = ("client", "limit", "outstanding")

    def __init__(self, client: C, limit: int) -> None:
        self.client = client
        #: The most connections this pool opens (requests past it wait in its queue).
        self.limit = limit
        #: Requests holding one of its connections now.
        self.outstanding = 0

    def __repr__(self) -> str:
        return f"<Shard {self.outstanding}/{self.limit}>"


class ShardedPool(Generic[C]):
    """``max_connections`` connections to one upstream, as ``ceil(max_connections /
    connections_per_pool)`` pools whose limits (and ``max_keepalive``) are split evenly.

    ``open_client(max_connections, max_keepalive)`` builds one pool's client. The first
    pool opens at once; another only when every open one has all its connections busy,
    so light traffic keeps reusing a few warm connections. :meth:`checkout` hands out
    the open pool with the most free connections (the fewest requests on it, as pools
    differ by one at most); give it back with :meth:`checkin`.
    Engine loop only; never blocks.
    """

    def __init__(
        self,
        open_client: Callable[[int, int], C],
        *,
        max_connections: int,
        max_keepalive: int,
        connections_per_pool: int,
    ) -> None:
        count = -(-max_connections // connections_per_pool)
        self._sizes = list(
            zip(split(max_connections, count), split(max_keepalive, count), strict=True)
        )
        self._open_client = open_client
        self.shards: list[Shard[C]] = []
        self._open_next()

    def __repr__(self) -> str:
        return f"<ShardedPool {len(self.shards)}/{len(self._sizes)} open>"

    @property
    def count(self) -> int:
        """The most pools this upstream may open."""
        return len(self._sizes)

    @property
    def first(self) -> C:
        """The first pool's client (always open)."""
        return self.shards[0].client

    def _open_next(self) -> Shard[C]:
        connections, keepalive = self._sizes[len(self.shards)]
        shard = Shard(self._open_client(connections, keepalive), connections)
        self.shards.append(shard)
        return shard

    def checkout(self) -> Shard[C]:
        """The pool for the next request, counted as holding one of its connections
        until :meth:`checkin`: the open one with the most free connections, or a new one
        when every open pool is full and the limit allows (when all are full and none is
        left, the least overloaded; the request waits there for a connection)."""
        best: Shard[C] | None = None
        free = 0
        for shard in self.shards:
            if best is None or shard.limit - shard.outstanding > free:
                best, free = shard, shard.limit - shard.outstanding
                if not shard.outstanding:
                    break  # nothing beats an idle pool
        assert best is not None
        if free <= 0 and len(self.shards) < len(self._sizes):
            best = self._open_next()
        best.outstanding += 1
        return best

    def checkin(self, shard: Shard[C]) -> None:
        """``shard``'s request ended (its response is closed)."""
        shard.outstanding -= 1

    async def aclose(self) -> None:
        """Close every open pool's client."""
        shards, self.shards = self.shards, []
        for shard in shards:
            await shard.client.aclose()
