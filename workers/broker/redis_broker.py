"""The worker's view of the queue: a small :class:`Broker` interface and its Redis Streams
implementation :class:`RedisBroker`.

The worker loop only talks to a broker; ``memory_broker.MemoryBroker`` implements the same
semantics in memory for unit tests. One broker instance serves one consumer of one model's
request stream. Every method that talks to Redis raises
:class:`~headrace.client.errors.BrokerError` (chained) when Redis is unreachable, so the loop
can back off and retry; atomic multi-step operations are the Lua scripts of
:mod:`headrace.workers.broker.scripts`.
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from headrace.client import errors as E
from headrace.client.functions import aensure_library
from headrace.client.keys import ModelKeys, registry_key
from headrace.client.protocol import now_ms
from headrace.workers.broker import scripts
from headrace.workers.broker.backlog import Backlog, group_backlog, last_entry_id, stale_lag
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
STATS_MAXLEN = 2000
REFRESH_CHUNK = 1000  # ids per refresh script call (Lua unpack() stack limit is ~8000)


@dataclass(frozen=True)
class Entry:
    """One request entry as delivered to this consumer.

    Attributes:
        entry_id: the stream id.
        fields: raw entry fields (bytes to bytes).
        deliveries: how many times the group delivered it (1 for a first read).
    """

    entry_id: str
    fields: Mapping[bytes, bytes]
    deliveries: int = 1


@dataclass(frozen=True)
class Ack:
    """Acknowledge without answering (the request was answered before)."""

    entry_id: str


@dataclass(frozen=True)
class Reply:
    """Write ``fields`` (an encoded result) to ``reply_to`` unless ``request_id`` was
    answered already, then acknowledge."""

    entry_id: str
    request_id: str
    reply_to: str
    fields: Mapping[bytes, bytes]


@dataclass(frozen=True)
class DeadLetterOp:
    """Move an entry to the dead-letter stream (original fields + ``dlq_*``), tell the
    producer when it can be told (``reply_fields``), and acknowledge."""

    entry_id: str
    fields: Mapping[bytes, bytes]
    reason: str
    code: str
    deliveries: int
    request_id: str | None = None
    reply_to: str | None = None
    reply_fields: Mapping[bytes, bytes] | None = None

    def dlq_fields(self, at_ms: int) -> dict[bytes, bytes]:
        out = {k: v for k, v in self.fields.items() if not k.startswith(b"dlq_")}
        out.update({b"dlq_reason": self.reason[:1000].encode(), b"dlq_code": self.code.encode(),
                    b"dlq_entry_id": self.entry_id.encode(), b"dlq_deliveries": str(self.deliveries).encode(),
                    b"dlq_ts_ms": str(at_ms).encode()})
        return out


Op = Ack | Reply | DeadLetterOp

# Outcome codes returned by Broker.commit, one per op.
WRITTEN = 1
DUPLICATE = 0
UNWRITABLE = -1


@dataclass(frozen=True)
class BatchStats:
    """One line of the ``<ns>:{<model>}:stats`` stream (see ``workers/admin/status.py``)."""

    worker: str
    batch: int
    ok: int
    failed: int
    infer_ms: float
    lat_ms: Sequence[float] = field(default_factory=tuple)

    def to_fields(self, at_ms: int) -> dict[bytes, bytes]:
        return {b"ts_ms": str(at_ms).encode(), b"worker": self.worker.encode(), b"batch": str(self.batch).encode(),
                b"ok": str(self.ok).encode(), b"failed": str(self.failed).encode(),
                b"infer_ms": f"{self.infer_ms:.3f}".encode(),
                b"lat_ms": msgpack.packb([round(float(x), 3) for x in self.lat_ms])}


class Broker(abc.ABC):
    """One consumer's access to one model's request stream. See module doc."""

    consumer: str

    @abc.abstractmethod
    async def ensure_group(self) -> None:
        """Create the consumer group at id 0 (serving entries added before any worker)."""

    @abc.abstractmethod
    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """New entries for this consumer (``XREADGROUP ... >``), waiting up to ``block_ms``."""

    @abc.abstractmethod
    async def claim_abandoned(self, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over entries pending longer than ``min_idle_ms`` (any consumer, this one
        included), with their delivery counts."""

    @abc.abstractmethod
    async def refresh_lease(self, entry_ids: Sequence[str]) -> list[str]:
        """Reset the idle time of the given entries this consumer still owns; returns
        those it still owns (the others were claimed by someone else)."""

    @abc.abstractmethod
    async def release(self, entries: Sequence[Entry], idle_ms: int) -> list[str]:
        """Hand back entries this consumer holds but never ran: each becomes claimable at
        once (idle ``idle_ms``) with its delivery count as before this consumer got it.
        Returns the ids handed back (entries claimed by someone else are left alone)."""

    @abc.abstractmethod
    async def answered(self, request_ids: Sequence[str]) -> list[bool]:
        """Whether each request id has a dedupe marker (was answered)."""

    async def cancel_marks(self, request_ids: Sequence[str]) -> list[int]:
        """Per request id, the time (Unix ms) up to which its submissions were cancelled
        (its cancel marker, ``ModelKeys.cancel``), 0 when none. A broker without cancel
        markers runs everything."""
        return [0] * len(request_ids)

    @abc.abstractmethod
    async def commit(self, ops: Sequence[Op], stats: Sequence[BatchStats] = ()) -> list[int]:
        """Apply ops atomically (results, dead letters, acks); one outcome per op
        (:data:`WRITTEN`, :data:`DUPLICATE`, :data:`UNWRITABLE`). Also appends the ``stats``
        lines (not atomically: they are informational)."""

    @abc.abstractmethod
    async def trim(self) -> int:
        """Remove entries every group has acknowledged; returns how many."""

    @abc.abstractmethod
    async def backlog(self) -> Backlog:
        """Current lag and pending count of the group."""

    @abc.abstractmethod
    async def heartbeat(self, worker: Mapping[str, Any], describe: Mapping[str, Any] | None = None,
                        stale_ms: int = 30_000) -> None:
        """Register this worker in ``<ns>:models`` (format: :mod:`headrace.client.registry`).

        Args:
            worker: flat JSON-able facts of this worker (``version``, ``backend``, batching
                limits, ``host``, ``pid``); ``seen_ms`` is set from the broker's clock.
            describe: the servable's description, stored per version (None keeps it).
            stale_ms: drop other workers whose last heartbeat is older than this.
        """

    @abc.abstractmethod
    async def unregister(self) -> None:
        """Remove this worker from ``<ns>:models``."""

    @abc.abstractmethod
    async def delete_idle_consumers(self, min_idle_ms: int, only: str | None = None) -> list[str]:
        """Delete consumers with no pending entries idle at least ``min_idle_ms``."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise BrokerError unless the broker answers."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections. Idempotent."""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _ms(value: Any) -> int:
    """A cancel marker's value (Unix ms as text) as an int; 0 when absent or malformed."""
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def _pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _stream_entries(resp: Any) -> list[tuple[Any, Any]]:
    """(id, fields) pairs of a one-stream XREADGROUP reply, whichever shape redis-py gives:
    RESP2-style ``[[stream, entries]]``, or RESP3-style ``{stream: entries}`` /
    ``{stream: [entries]}``."""
    if not resp:
        return []
    groups = list(resp.values()) if isinstance(resp, dict) else [item[1] for item in resp]
    out: list[tuple[Any, Any]] = []
    for entries in groups:
        if entries and isinstance(entries[0], list):  # {stream: [entries]}
            entries = [e for sub in entries for e in sub]
        out.extend((e[0], e[1]) for e in entries)
    return out


def _flat(fields: Mapping[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = [str(len(fields)).encode()]
    for k, v in fields.items():
        out += [k, v]
    return out


class RedisBroker(Broker):
    """:class:`Broker` on Redis Streams through ``redis.asyncio``.

    The client is created lazily inside the running event loop (a ``redis.asyncio``
    connection belongs to the loop that opened it). Connection problems surface as
    :class:`~headrace.client.errors.BrokerError`; the caller retries with backoff.

    Args:
        settings: stream, group and consumer names, TTLs.
        client: an existing ``redis.asyncio.Redis`` (bytes responses) to use instead.
    """

    def __init__(self, settings: WorkerSettings, client: Any = None) -> None:
        self.settings = settings
        self.keys = ModelKeys(settings.namespace, settings.model, settings.group)
        self.consumer = settings.effective_consumer
        self._client = client
        self._owns_client = client is None
        self._scripts: dict[str, Any] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            import redis.asyncio as aredis

            # The socket timeout must outlast a blocking XREADGROUP, or a healthy idle read
            # would be reported as a dead connection.
            self._client = aredis.Redis.from_url(
                self.settings.effective_redis_url, decode_responses=False,
                socket_connect_timeout=2.0, socket_timeout=self.settings.block_ms / 1000.0 + 10.0,
                health_check_interval=30)
        return self._client

    def _script(self, name: str) -> Any:
        s = self._scripts.get(name)
        if s is None:
            s = self._scripts[name] = self.client.register_script(getattr(scripts, name))
        return s

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation, turning connection failures into BrokerError and
        recreating the group once when Redis lost it (restart without persistence)."""
        import redis

        for attempt in (0, 1):
            try:
                return await fn()
            except redis.ResponseError as e:
                if "NOGROUP" in str(e) and attempt == 0:
                    log.warning("%s: consumer group missing (Redis restarted?), recreating", what)
                    await self.ensure_group()
                    continue
                raise E.BrokerError(f"{what} failed: {e}") from e
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                raise E.BrokerError(f"{what}: Redis unreachable: {e}") from e
        raise AssertionError("unreachable")

    async def ensure_group(self) -> None:
        import redis

        await self.ensure_functions()
        try:
            await self.client.xgroup_create(self.keys.requests, self.settings.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.settings.group, self.keys.requests)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise E.BrokerError(f"XGROUP CREATE {self.keys.requests} failed: {e}") from e
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise E.BrokerError(f"XGROUP CREATE: Redis unreachable: {e}") from e

    async def ensure_functions(self) -> None:
        """Load the producers' submit function (``client/submit.lua``) unless it is current,
        and publish this worker's ``max_payload_bytes`` in the model's limits hash, which the
        function applies to the whole entry (every field) before adding it.

        A worker user without those rights only logs a warning: the worker serves anyway, and
        an operator loads the library (``headrace functions load``).

        Raises:
            BrokerError: Redis is unreachable or failed otherwise.
        """
        import redis

        try:
            await aensure_library(self.client)
        except E.BrokerError as e:
            if not isinstance(e.__cause__, redis.exceptions.NoPermissionError):
                raise
            log.warning("this worker's Redis user may not load the submit function (%s); see docs/security.md "
                        "for the worker ACL, or have an operator run `headrace functions load`", e)
        try:
            await self.client.hset(self.keys.limits, "max_payload_bytes", str(self.settings.max_payload_bytes))
        except redis.exceptions.NoPermissionError as e:
            log.warning("this worker's Redis user may not publish its limits (%s); see docs/security.md", e)
        except redis.RedisError as e:
            raise E.BrokerError(f"HSET {self.keys.limits} failed: {e}") from e

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        async def go() -> Any:
            return await self.client.xreadgroup(self.settings.group, self.consumer, {self.keys.requests: ">"},
                                                count=count, block=block_ms)

        resp = await self._call("XREADGROUP", go)
        return [Entry(_s(entry_id), fields or {}, 1) for entry_id, fields in _stream_entries(resp)]

    async def claim_abandoned(self, min_idle_ms: int, count: int) -> list[Entry]:
        out: list[Entry] = []
        cursor = "0-0"
        # Walk the whole PEL once (bounded by count entries claimed) so idle entries behind a
        # long run of fresh ones are still found.
        for _ in range(64):
            args = [self.settings.group, self.consumer, int(min_idle_ms), cursor, count - len(out)]

            async def go(args: list[Any] = args) -> Any:
                return await self._script("CLAIM")(keys=[self.keys.requests], args=args)

            next_cursor, claimed = await self._call("XAUTOCLAIM", go)
            for entry_id, flat, deliveries in claimed:
                out.append(Entry(_s(entry_id), _pairs(flat), int(deliveries)))
            cursor = _s(next_cursor)
            if cursor == "0-0" or len(out) >= count:
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

            owned += [_s(x) for x in await self._call("lease refresh", go)]
        return owned

    async def release(self, entries: Sequence[Entry], idle_ms: int) -> list[str]:
        out: list[str] = []
        for i in range(0, len(entries), REFRESH_CHUNK // 2):
            args: list[Any] = [self.settings.group, self.consumer, int(idle_ms)]
            for e in entries[i:i + REFRESH_CHUNK // 2]:
                args += [e.entry_id, e.deliveries]

            async def go(args: list[Any] = args) -> Any:
                return await self._script("RELEASE")(keys=[self.keys.requests], args=args)

            out += [_s(x) for x in await self._call("release", go)]
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

    async def cancel_marks(self, request_ids: Sequence[str]) -> list[int]:
        if not request_ids:
            return []
        keys = [self.keys.cancel(rid) for rid in request_ids]

        async def go() -> Any:
            return await self.client.mget(keys)

        return [_ms(v) for v in await self._call("cancel check", go)]

    def _commit_args(self, ops: Sequence[Op], at_ms: int) -> tuple[list[str], list[Any]]:
        keys = [self.keys.requests, self.keys.dlq]
        args: list[Any] = [self.settings.group, self.settings.dedupe_ttl_s, self.settings.reply_ttl_s * 1000, at_ms]
        for op in ops:
            if isinstance(op, Ack):
                args += [b"A", op.entry_id]
            elif isinstance(op, Reply):
                # reply_to comes from the producer: the SDK keeps it in this model's hash slot
                # (cluster-safe); on a single Redis any key works.
                keys += [self.keys.done(op.request_id), op.reply_to]
                args += [b"R", op.entry_id, *_flat(op.fields)]
            else:
                with_reply = op.request_id is not None and op.reply_to is not None and op.reply_fields is not None
                if with_reply:
                    assert op.request_id is not None and op.reply_to is not None
                    keys += [self.keys.done(op.request_id), op.reply_to]
                args += [b"D", op.entry_id, b"1" if with_reply else b"0", *_flat(op.dlq_fields(at_ms)),
                         *_flat(op.reply_fields or {})]
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
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            for line in stats:
                pipe.xadd(self.keys.stats, line.to_fields(at), maxlen=STATS_MAXLEN, approximate=True)
            res = list(await pipe.execute(raise_on_error=False))
            if ops and isinstance(res[0], redis.exceptions.NoScriptError):
                # Script cache empty (Redis restarted, SCRIPT FLUSH): nothing was written;
                # the Script call loads it and runs the commit on its own.
                res[0] = await script(keys=keys, args=args)
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

        return [_s(x) for x in await self._call("consumer cleanup", go)]

    async def ping(self) -> None:
        async def go() -> Any:
            return await self.client.ping()

        await self._call("PING", go)

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            try:
                await self._client.aclose()
            except Exception as e:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
                log.debug("closing redis client: %s", e)
            self._client = None
            self._scripts.clear()
