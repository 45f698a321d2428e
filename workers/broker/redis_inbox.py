"""The model's inbox on Redis: waiting for it, and relaying it into the request stream.

Strict submit mode (docs/protocol.md, "The relay") puts producers' requests in a list, the
inbox; workers move them into the request stream with ``FCALL headrace_relay``
(``client/submit.lua``), which checks every element again.
"""

from __future__ import annotations

from typing import Any

from headrace.client.functions import RELAY_FUNCTION
from headrace.client.protocol import now_ms
from headrace.workers.broker.inbox import RelayStep
from headrace.workers.broker.redis_conn import RedisConnection
from headrace.workers.pipeline.ops import DLQ_ENTRY_BYTES, DLQ_ENTRY_FIELDS, DLQ_SCRIPT_NAMES


class RedisInbox(RedisConnection):
    """Inbox operations of :class:`~headrace.workers.broker.base.Broker` on Redis."""

    def _relay_command(self, count: int, *, server_time: bool = False) -> list[Any]:
        # server_time: the function stamps dead letters with Redis' clock when it runs,
        # for a call queued behind a wait (a time taken now would be up to the wait early).
        keys = [self.keys.requests, self.keys.limits, self.keys.inbox, self.keys.dlq]
        return ["FCALL", RELAY_FUNCTION, len(keys), *keys, max(1, int(count)), *DLQ_SCRIPT_NAMES,
                DLQ_ENTRY_BYTES, DLQ_ENTRY_FIELDS, "" if server_time else now_ms()]

    def _wait_command(self, block_ms: int) -> list[Any]:
        # BLMOVE of the inbox onto itself: it blocks until an element is there and rotates
        # it instead of taking it, so a worker that dies before its relay call leaves the
        # element for the others; the relay function then moves it atomically. The element
        # itself is dropped unread (the relay bounds it before anyone decodes it).
        return ["BLMOVE", self.keys.inbox, self.keys.inbox, "LEFT", "RIGHT", max(0.001, block_ms / 1000.0)]

    async def relay(self, count: int) -> RelayStep:
        command = self._relay_command(count)

        async def go() -> Any:
            return await self.client.execute_command(*command)

        added, dead, left = await self._call("inbox relay", go)
        return RelayStep(int(added), int(dead), int(left))

    async def wait_inbox(self, block_ms: int) -> bool:
        command = self._wait_command(block_ms)

        async def go() -> Any:
            return await self.client.execute_command(*command)

        return await self._call("BLMOVE", go) is not None

    async def wait_and_relay(self, count: int, block_ms: int) -> RelayStep:
        wait, relay = self._wait_command(block_ms), self._relay_command(count, server_time=True)

        async def go() -> Any:
            # One round trip: Redis runs a client's pipelined commands in order and holds
            # the FCALL until the BLMOVE before it unblocks, so the relay starts as soon as
            # an element arrives instead of after a reply and another request (one hop less
            # on every request's way in at moderate load). The wait still takes nothing: if
            # this worker dies after sending, the function runs anyway or not at all, and
            # the element is moved atomically by one relay or stays in the inbox. When the
            # wait times out the function finds the inbox empty and moves nothing. Dead
            # letters get the server's time when the function runs, not when this was sent.
            # On a Redis Cluster both commands name keys of the model's one slot, so the
            # cluster pipeline sends them to one node together; a pipeline it re-sends
            # after a redirect or a lost connection repeats only a rotation and a relay
            # step, both harmless to run twice.
            pipe = self.client.pipeline(transaction=False)
            pipe.execute_command(*wait)
            pipe.execute_command(*relay)
            return (await pipe.execute())[1]

        added, dead, left = await self._call("inbox wait and relay", go)
        return RelayStep(int(added), int(dead), int(left))

