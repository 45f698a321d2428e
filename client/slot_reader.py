"""The reply reader's ``XREAD`` on a Redis Cluster, where one command may not span slots.

A client of a partitioned model has one reply stream per partition, each in its partition's
slot (the worker's commit script must stay in one slot), and a cluster refuses an ``XREAD``
over several slots (``CROSSSLOT``). :class:`SlotReader` therefore reads slot by slot: first
every slot without blocking (what is there comes back at once); only when all are empty does
it block, on one slot at a time, in turn, for a short slice that doubles while nothing comes
(from 1 ms up to ``max_slice_ms``) and drops back to 1 ms when something does. Under load
the reads never wait; an idle client costs each shard a few reads a second, and a reply
that ends an idle stretch waits at most one slice per slot.

Reading is side-effect free (``XREAD``, no group), so nothing is lost when a read is cut
short: the cursors say where the next one starts.

One shard down (with ``cluster-require-full-coverage no`` the others keep serving) fails
the pipelined read. The reader then reads slot by slot, keeps what the reachable slots
hold and blocks only on those, so the replies of the other partitions keep coming while a
request of this client waits on the dead one. It raises only when no slot answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

from headrace.client.sharding import by_slot

MAX_SLICE_MS = 50
#: what a cluster client raises for a node it cannot reach or a slot it cannot route.
UNREACHABLE = (redis.RedisError, redis.exceptions.RedisClusterException)


class SlotReader:
    """``XREAD`` of many streams over a cluster client, one slot per command (see module doc).

    Args:
        max_slice_ms: the longest blocking slice on one slot.
    """

    def __init__(self, max_slice_ms: int = MAX_SLICE_MS) -> None:
        self.max_slice_ms = max_slice_ms
        self._slice_ms = 1
        self._turn = 0

    def read(self, r: Any, streams: Mapping[str, Any], count: int, block_ms: int) -> list[Any]:
        """Entries of ``streams`` (``stream -> last id read``) as a RESP2 ``XREAD`` reply
        (``[[stream, entries], ...]``), waiting up to about ``block_ms`` when none is there.

        Raises:
            redis.RedisError: a node is unreachable.
        """
        groups = by_slot(streams)
        if not groups:
            return []
        pipe = r.pipeline(transaction=False)
        for g in groups:
            pipe.xread(g, count=count)
        try:
            out = self._found(pipe.execute())
        except UNREACHABLE:
            out, groups = self._each(r, groups, count)
        if out:
            return out
        group, wait = self._next_wait(groups, block_ms)
        return list(r.xread(group, count=count, block=wait) or [])

    def _each(self, r: Any, groups: list[dict[str, Any]], count: int) -> tuple[list[Any], list[dict[str, Any]]]:
        """One non-blocking ``XREAD`` per slot: the entries found and the slots that answered.

        Raises:
            redis.RedisError: no slot answered (the last error).
        """
        replies, answered = [], []
        error: BaseException | None = None
        for g in groups:
            try:
                replies.append(r.xread(g, count=count))
                answered.append(g)
            except UNREACHABLE as e:
                error = e
        return self._settle(replies, answered, error)

    def _settle(self, replies: list[Any], answered: list[dict[str, Any]],
                error: BaseException | None) -> tuple[list[Any], list[dict[str, Any]]]:
        """What the slot-by-slot reads found, and the slots that answered; raises the last
        error when none did."""
        if not answered and error is not None:
            raise error
        return self._found(replies), answered

    def _found(self, replies: list[Any]) -> list[Any]:
        """The entries of the non-blocking reads, one ``XREAD`` reply per slot; a read that
        found something resets the slice."""
        out: list[Any] = []
        for reply in replies:
            out += list(reply or [])
        if out:
            self._slice_ms = 1
        return out

    def _next_wait(self, groups: list[dict[str, Any]], block_ms: int) -> tuple[dict[str, Any], int]:
        """The slot to block on (the next in turn) and for how long (ms); doubles the slice."""
        self._turn = (self._turn + 1) % len(groups)
        wait = max(1, min(block_ms, self._slice_ms))
        self._slice_ms = min(self.max_slice_ms, self._slice_ms * 2)
        return groups[self._turn], wait


class AsyncSlotReader(SlotReader):
    """:class:`SlotReader` for ``redis.asyncio`` cluster clients."""

    async def aread(self, r: Any, streams: Mapping[str, Any], count: int, block_ms: int) -> list[Any]:
        """See :meth:`SlotReader.read`."""
        groups = by_slot(streams)
        if not groups:
            return []
        pipe = r.pipeline(transaction=False)
        for g in groups:
            pipe.xread(g, count=count)
        try:
            out = self._found(await pipe.execute())
        except UNREACHABLE:
            out, groups = await self._aeach(r, groups, count)
        if out:
            return out
        group, wait = self._next_wait(groups, block_ms)
        return list(await r.xread(group, count=count, block=wait) or [])

    async def _aeach(self, r: Any, groups: list[dict[str, Any]], count: int) -> tuple[list[Any], list[dict[str, Any]]]:
        """See :meth:`SlotReader._each`."""
        replies, answered = [], []
        error: BaseException | None = None
        for g in groups:
            try:
                replies.append(await r.xread(g, count=count))
                answered.append(g)
            except UNREACHABLE as e:
                error = e
        return self._settle(replies, answered, error)
