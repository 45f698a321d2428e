"""The :class:`~headrace.workers.broker.base.Broker` on Redis Streams (``redis.asyncio``).

Atomic multi-step operations are the Lua scripts of :mod:`headrace.workers.broker.scripts`.
Reads and claims go through scripts that size them to a byte budget (``READ``, ``CLAIM``):
an entry larger than ``max_entry_bytes`` is delivered to this consumer but only its routing
fields leave Redis, so the worker can dead-letter it without ever holding its payload.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from headrace.client import errors as E
from headrace.client.keys import registry_key
from headrace.client.protocol import now_ms
from headrace.workers.broker import scripts
from headrace.workers.broker.backlog import Backlog, group_backlog, last_entry_id, stale_lag
from headrace.workers.broker.base import CommitRejected
from headrace.workers.broker.redis_inbox import RedisInbox
from headrace.workers.broker.replies import (
    flat_fields,
    is_transient,
    marker_ms,
    script_entry,
    sized,
    stream_entries,
    text,
)
from headrace.workers.pipeline.entry import (
    ROUTING_FIELD_MAX_BYTES,
    ROUTING_FIELDS,
    Entry,
)
from headrace.workers.pipeline.ops import DLQ_SCRIPT_NAMES, Ack, Op, Reply
from headrace.workers.pipeline.stats import BatchStats

log = logging.getLogger(__name__)

STATS_MAXLEN = 2000
REFRESH_CHUNK = 1000  # ids per refresh script call (Lua unpack() stack limit is ~8000)
CLAIM_PAGES = 64  # most CLAIM script calls per claim_abandoned (pages of the pending list)


class RedisBroker(RedisInbox):
    """:class:`~headrace.workers.broker.base.Broker` on Redis Streams through ``redis.asyncio``.

    Connection, setup and error handling come from
    :class:`~headrace.workers.broker.redis_conn.RedisConnection`, the inbox relay from
    :class:`~headrace.workers.broker.redis_inbox.RedisInbox`; this class reads, leases,
    commits and reports.

    Args:
        settings: stream, group and consumer names, TTLs.
        client: an existing ``redis.asyncio.Redis`` (bytes responses) to use instead.
        keys: the key set to serve (one partition of the model); None: the model's
            unpartitioned keys.
    """

    def _sizing_args(self, budget_bytes: int | None) -> list[Any]:
        budget = self.default_budget_bytes if budget_bytes is None else budget_bytes
        return [max(1, int(budget)), self.max_entry_bytes, ROUTING_FIELD_MAX_BYTES, *ROUTING_FIELDS]

    async def read(self, count: int, block_ms: int, budget_bytes: int | None = None) -> list[Entry]:
        # What is there already, sized to the budget by the READ script; only when nothing
        # is, one blocking XREADGROUP COUNT 1: a script cannot block, and one entry is the
        # most a wait can bring in unsized.
        ready = await self.read_ready(count, budget_bytes)
        if ready:
            return ready

        async def wait() -> Any:
            return await self.client.xreadgroup(self.settings.group, self.consumer, {self.keys.requests: ">"},
                                                count=1, block=max(1, int(block_ms)))

        resp = await self._call("XREADGROUP", wait)
        return [sized(Entry(text(entry_id), fields or {}, 1), self.max_entry_bytes)
                for entry_id, fields in stream_entries(resp)]

    async def read_ready(self, count: int, budget_bytes: int | None = None) -> list[Entry]:
        args = [self.settings.group, self.consumer, max(1, int(count)), *self._sizing_args(budget_bytes)]

        async def go() -> Any:
            return await self._script("READ")(keys=[self.keys.requests], args=args)

        return [script_entry(item) for item in await self._call("XREADGROUP", go)]

    async def claim_abandoned(self, min_idle_ms: int, count: int, budget_bytes: int | None = None) -> list[Entry]:
        out: list[Entry] = []
        start = "-"
        left = self.default_budget_bytes if budget_bytes is None else int(budget_bytes)
        # Walk the pending list page by page (bounded) so idle entries behind a long run of
        # fresh ones are still found.
        for _ in range(CLAIM_PAGES):
            args = [self.settings.group, self.consumer, int(min_idle_ms), start, count - len(out),
                    *self._sizing_args(left)]

            async def go(args: list[Any] = args) -> Any:
                return await self._script("CLAIM")(keys=[self.keys.requests], args=args)

            next_start, items, full = await self._call("XAUTOCLAIM", go)
            for item in items:
                entry = script_entry(item[:-1], int(item[-1]))
                out.append(entry)
                left -= 0 if entry.truncated else entry.size_bytes
            start = text(next_start)
            if start == "0-0" or int(full) or len(out) >= count or left <= 0:
                break
        return out

    async def refresh_lease(self, entry_ids: Sequence[str]) -> list[str]:
        owned: list[str] = []
        ids = list(entry_ids)
        for i in range(0, len(ids), REFRESH_CHUNK):
            chunk = ids[i:i + REFRESH_CHUNK]

            async def go(chunk: list[str] = chunk) -> Any:
                return await self._script("REFRESH")(keys=[self.keys.requests],
                                                     args=[self.settings.group, self.consumer, *chunk])

            owned += [text(x) for x in await self._call("lease refresh", go)]
        return owned

    async def release(self, entries: Sequence[Entry], idle_ms: int) -> list[str]:
        out: list[str] = []
        for i in range(0, len(entries), REFRESH_CHUNK // 2):
            args: list[Any] = [self.settings.group, self.consumer, int(idle_ms)]
            for e in entries[i:i + REFRESH_CHUNK // 2]:
                args += [e.entry_id, e.deliveries]

            async def go(args: list[Any] = args) -> Any:
                return await self._script("RELEASE")(keys=[self.keys.requests], args=args)

            out += [text(x) for x in await self._call("release", go)]
        return out

    async def answered(self, request_ids: Sequence[str]) -> list[bool]:
        if not request_ids:
            return []

        keys = [self.keys.done(rid) for rid in request_ids]

        async def count() -> Any:
            return await self.client.exists(*keys)

        # Common case: one multi-key EXISTS says none was answered. Only when some were,
        # ask per key (pipelined, one round trip) which ones.
        if not int(await self._call("dedupe pre-check", count)):
            return [False] * len(keys)

        async def each() -> Any:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return await pipe.execute()

        return [bool(x) for x in await self._call("dedupe pre-check", each)]

    async def prechecks(self, request_ids: Sequence[str]) -> tuple[list[bool], list[int]]:
        if not request_ids:
            return [], []
        done_keys = [self.keys.done(rid) for rid in request_ids]
        cancel_keys = [self.keys.cancel(rid) for rid in request_ids]

        async def both() -> Any:
            # One round trip for both markers (on a Redis Cluster every key is in the
            # model's slot, so the cluster pipeline sends both to one node): on an idle
            # worker this check sits between every request's read and its model call.
            # (plain commands: redis-py's cluster pipeline refuses some methods but routes
            # a multi-key command of one slot like any other; plain EVAL for the same reason:
            # the script text is small, and Redis compiles it once)
            pipe = self.client.pipeline(transaction=False)
            pipe.execute_command("EXISTS", *done_keys)
            pipe.execute_command("EVAL", scripts.CANCEL_MARKS, len(cancel_keys), *cancel_keys)
            return await pipe.execute()

        count, marks = await self._call("dedupe and cancel pre-check", both)
        done = await self.answered(request_ids) if int(count) else [False] * len(request_ids)
        return done, [marker_ms(v) for v in marks]

    async def cancel_marks(self, request_ids: Sequence[str]) -> list[int]:
        if not request_ids:
            return []
        keys = [self.keys.cancel(rid) for rid in request_ids]

        async def go() -> Any:
            return await self.client.execute_command("EVAL", scripts.CANCEL_MARKS, len(keys), *keys)

        return [marker_ms(v) for v in await self._call("cancel check", go)]

    def _commit_args(self, ops: Sequence[Op], at_ms: int) -> tuple[list[str], list[Any]]:
        keys = [self.keys.requests, self.keys.dlq]
        args: list[Any] = [self.settings.group, self.settings.dedupe_ttl_s, self.settings.reply_ttl_s * 1000, at_ms,
                           *DLQ_SCRIPT_NAMES]
        for op in ops:
            if isinstance(op, Ack):
                args += [b"A", op.entry_id]
            elif isinstance(op, Reply):
                # reply_to comes from the producer: the SDK keeps it in this model's hash slot
                # (cluster-safe); on a single Redis any key works.
                keys += [self.keys.done(op.request_id), op.reply_to]
                args += [b"R", op.entry_id, *flat_fields(op.fields)]
            else:
                with_reply = op.request_id is not None and op.reply_to is not None and op.reply_fields is not None
                if with_reply:
                    assert op.request_id is not None and op.reply_to is not None
                    keys += [self.keys.done(op.request_id), op.reply_to]
                args += [b"D", op.entry_id, b"1" if with_reply else b"0", *flat_fields(op.dlq_fields(at_ms)),
                         *flat_fields(op.reply_fields or {})]
        return keys, args

    async def commit(self, ops: Sequence[Op], stats: Sequence[BatchStats] = ()) -> list[int]:
        if not ops and not stats:
            return []
        at = now_ms()
        keys, args = self._commit_args(ops, at)

        async def go() -> Any:
            import redis

            # One round trip: the atomic commit script and the (non-critical) stats line.
            # EVALSHA goes straight into the pipeline: a registered Script in a pipeline
            # makes redis-py send SCRIPT EXISTS before every execute, a second round trip
            # per batch on the hot path.
            script = self._script("COMMIT")
            pipe = self.client.pipeline(transaction=False)
            if ops:
                # (as a plain command: redis-py's cluster pipeline refuses its evalsha method
                # but routes EVALSHA by its keys like any other command)
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            for line in stats:
                pipe.xadd(self.keys.stats, line.to_fields(at), maxlen=STATS_MAXLEN, approximate=True)
            res = list(await pipe.execute(raise_on_error=False))
            if ops and isinstance(res[0], redis.exceptions.NoScriptError):
                # Script cache empty (Redis restarted, SCRIPT FLUSH): nothing was written;
                # the Script call loads it and runs the commit on its own.
                try:
                    res[0] = await script(keys=keys, args=args)
                except redis.ResponseError as e:
                    res[0] = e
            if ops and isinstance(res[0], redis.ResponseError) and not is_transient(res[0]):
                # The script refused the ops (e.g. a reply key in another cluster slot, a DLQ
                # key of another type): the same ops would fail the same way. Redis does not
                # roll a script back, but what it applied before the failing op carries
                # dedupe markers, so committing those ops again only acks them.
                raise CommitRejected(f"commit of {len(ops)} ops refused: {res[0]}") from res[0]
            if ops and isinstance(res[0], Exception):
                raise res[0]
            for r in res[1 if ops else 0:]:
                if isinstance(r, Exception):
                    log.debug("stats line not written: %s", r)
            return res

        res = await self._call("commit", go)
        return [int(x) for x in res[0]] if ops else []

    async def trim(self) -> int:
        async def go() -> Any:
            return await self._script("TRIM")(keys=[self.keys.requests], args=[])

        return int(await self._call("trim", go))

    async def publish_samples_per_entry(self, value: float) -> None:
        async def go() -> Any:
            return await self.client.hset(self.keys.limits, "samples_per_entry", f"{max(1.0, value):.2f}")

        await self._call("HSET samples_per_entry", go)

    async def backlog(self) -> Backlog:
        async def go() -> Any:
            pipe = self.client.pipeline(transaction=False)
            pipe.xinfo_groups(self.keys.requests)
            pipe.xlen(self.keys.requests)
            pipe.xrevrange(self.keys.requests, "+", "-", count=1)
            return await pipe.execute()

        import redis

        try:
            groups, length, tail = await self._call("XINFO GROUPS", go)
        except E.BrokerError as e:
            if isinstance(e.__cause__, redis.ResponseError):  # no stream yet
                return Backlog(0, 0)
            raise
        last_id = last_entry_id(tail)
        if stale_lag(groups, self.settings.group, last_id):
            async def repair() -> Any:
                return await self._script("REPAIR_LAG")(keys=[self.keys.requests], args=[self.settings.group])

            if int(await self._call("lag repair", repair)):
                log.info("repaired the stale lag of group %s on %s (Redis reloaded an old entries-read)",
                         self.settings.group, self.keys.requests)
        return group_backlog(groups, self.settings.group, int(length), last_id)

    async def heartbeat(self, worker: Mapping[str, Any], describe: Mapping[str, Any] | None = None,
                        stale_ms: int = 30_000) -> None:
        args = [self.settings.model, self.consumer, json.dumps(dict(worker), default=str),
                json.dumps(describe, default=str) if describe is not None else "", stale_ms, "up"]

        async def go() -> Any:
            return await self._script("REGISTER")(keys=[registry_key(self.settings.namespace)], args=args)

        await self._call("registry heartbeat", go)

    async def unregister(self) -> None:
        args = [self.settings.model, self.consumer, "{}", "", 2**40, "down"]

        async def go() -> Any:
            return await self._script("REGISTER")(keys=[registry_key(self.settings.namespace)], args=args)

        await self._call("registry unregister", go)

    async def delete_idle_consumers(self, min_idle_ms: int, only: str | None = None) -> list[str]:
        async def go() -> Any:
            return await self._script("CLEANUP")(keys=[self.keys.requests],
                                                 args=[self.settings.group, int(min_idle_ms), only or ""])

        return [text(x) for x in await self._call("consumer cleanup", go)]

