"""Harnesses of the broker contract (tests/integration/test_broker_contract.py and
test_inbox_contract.py): the same scenarios run against the in-memory broker (the unit
tests' fake), the Redis broker, a model split into partitions, and (the inbox contract)
the Redis broker on a Redis Cluster, each wrapped so a scenario can set up and inspect the
queue the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import redis
import redis.cluster

from headrace.client.keys import ModelKeys, partition_keys
from headrace.workers.broker.base import Broker
from headrace.workers.broker.partitioned import PartitionedBroker, unwrap, wrap
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore

KEYS = ModelKeys("headrace", "affine")
REPLY = KEYS.reply("c")
PAYLOAD = 1024  # max_payload_bytes: entries above 1024 + 64 KiB are oversize
MAX_ENTRY = WorkerSettings(max_payload_bytes=PAYLOAD, memory_budget_bytes=10**7).max_entry_bytes


def req(rid: str, pad: int = 0, **extra: bytes) -> dict[bytes, bytes]:
    fields = {b"v": b"1", b"id": rid.encode(), b"reply_to": REPLY.encode(), b"body": b"x" * (pad or 10)}
    fields.update({k.encode(): v for k, v in extra.items()})
    return fields


def result_fields(rid: str) -> dict[bytes, bytes]:
    return {b"v": b"1", b"id": rid.encode(), b"status": b"ok"}


class MemoryHarness:
    name = "memory"
    dlq_key = MemoryStore.dlq_key
    requests_key = MemoryStore.requests_key

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.store.max_payload_bytes = PAYLOAD

    def broker(self, consumer: str = "a") -> Broker:
        return MemoryBroker(self.store, consumer, max_entry_bytes=MAX_ENTRY)

    def unreachable(self) -> Broker:
        store = MemoryStore()
        store.fail_ops = 10**9
        return MemoryBroker(store, "down")

    def add(self, fields: dict[bytes, bytes]) -> str:
        return self.store.add(fields)

    def stream_id(self, entry_id: str) -> str:
        """The id the request stream (and so a dead letter) knows ``entry_id`` by."""
        return entry_id

    def replies(self, key: str) -> list[dict[bytes, bytes]]:
        return [f for _, f in self.store.replies.get(key, [])]

    def dlq(self) -> list[dict[bytes, bytes]]:
        return [f for _, f in self.store.dlq]

    def pending(self) -> dict[str, tuple[str, int]]:
        return {i: (p.consumer, p.deliveries) for i, p in self.store.pel.items()}

    def wrong_type(self, key: str) -> None:
        self.store.wrong_type.add(key)

    def length(self) -> int:
        return len(self.store.entries)

    def samples_per_entry(self) -> float:
        return self.store.samples_per_entry

    def cancel(self, request_id: str, up_to_ms: int) -> None:
        self.store.cancel(request_id, up_to_ms)

    def push(self, element: bytes) -> None:
        self.store.push(element)

    def inbox(self) -> int:
        return len(self.store.inbox)

    async def close(self) -> None:
        pass


class RedisHarness:
    name = "redis"
    dlq_key = KEYS.dlq
    requests_key = KEYS.requests

    def __init__(self, url: str) -> None:
        self.url = url
        self.r = redis.Redis.from_url(url)
        self.brokers: list[Broker] = []

    def settings(self, consumer: str, url: str | None = None) -> WorkerSettings:
        return WorkerSettings(model="affine", redis_url=url or self.url, consumer=consumer, block_ms=100,
                              max_payload_bytes=PAYLOAD, memory_budget_bytes=10**7)

    def broker(self, consumer: str = "a") -> Broker:
        b = RedisBroker(self.settings(consumer))
        self.brokers.append(b)
        return b

    def unreachable(self) -> Broker:
        b = RedisBroker(self.settings("down", "redis://127.0.0.1:1/0"))
        self.brokers.append(b)
        return b

    def add(self, fields: dict[bytes, bytes]) -> str:
        return self.r.xadd(KEYS.requests, fields).decode()  # type: ignore[arg-type,union-attr]

    def stream_id(self, entry_id: str) -> str:
        return entry_id

    def replies(self, key: str) -> list[dict[bytes, bytes]]:
        return [f for _, f in self.r.xrange(key)]  # type: ignore[union-attr]

    def dlq(self) -> list[dict[bytes, bytes]]:
        return [f for _, f in self.r.xrange(KEYS.dlq)]  # type: ignore[union-attr]

    def pending(self) -> dict[str, tuple[str, int]]:
        rows = self.r.xpending_range(KEYS.requests, KEYS.group, "-", "+", 1000)
        return {row["message_id"].decode(): (row["consumer"].decode(), int(row["times_delivered"])) for row in rows}

    def wrong_type(self, key: str) -> None:
        self.r.set(key, "x")

    def length(self) -> int:
        return int(self.r.xlen(KEYS.requests))

    def samples_per_entry(self) -> float:
        return float(self.r.hget(KEYS.limits, "samples_per_entry") or 1)

    def cancel(self, request_id: str, up_to_ms: int) -> None:
        self.r.set(KEYS.cancel(request_id), str(up_to_ms))

    def push(self, element: bytes) -> None:
        self.r.rpush(KEYS.inbox, element)

    def inbox(self) -> int:
        return int(self.r.llen(KEYS.inbox))

    async def close(self) -> None:
        for b in self.brokers:
            await b.close()
        self.r.close()


class PartitionedHarness(RedisHarness):
    """A model split into 3 partitions (one :class:`PartitionedBroker` over 3 Redis brokers)
    whose producer routes every request of these scenarios to partition 1: the scenarios
    see one stream, as they assume, while every call goes through the partition routing
    (wrapped ids, rotating reads, waits on every partition). Spreading over partitions has
    its own tests (tests/integration/test_partitioned_broker.py)."""

    name = "partitioned"
    PART = 1
    ALL = partition_keys("headrace", "affine", 3)
    dlq_key = ALL[PART].dlq
    requests_key = ALL[PART].requests

    def _parts(self, settings: WorkerSettings) -> Broker:
        b = PartitionedBroker([RedisBroker(settings, keys=k) for k in self.ALL], route=lambda rid: self.PART)
        self.brokers.append(b)
        return b

    def broker(self, consumer: str = "a") -> Broker:
        return self._parts(self.settings(consumer))

    def unreachable(self) -> Broker:
        return self._parts(self.settings("down", "redis://127.0.0.1:1/0"))

    def add(self, fields: dict[bytes, bytes]) -> str:
        return wrap(self.PART, self.r.xadd(self.ALL[self.PART].requests, fields).decode())  # type: ignore[arg-type,union-attr]

    def stream_id(self, entry_id: str) -> str:
        return unwrap(entry_id)[1]  # the partition's stream knows the plain id

    def dlq(self) -> list[dict[bytes, bytes]]:
        return [f for _, f in self.r.xrange(self.dlq_key)]  # type: ignore[union-attr]

    def pending(self) -> dict[str, tuple[str, int]]:
        keys = self.ALL[self.PART]
        rows = self.r.xpending_range(keys.requests, keys.group, "-", "+", 1000)
        return {wrap(self.PART, row["message_id"].decode()): (row["consumer"].decode(), int(row["times_delivered"]))
                for row in rows}

    def length(self) -> int:
        return int(self.r.xlen(self.ALL[self.PART].requests))

    def cancel(self, request_id: str, up_to_ms: int) -> None:
        self.r.set(self.ALL[self.PART].cancel(request_id), str(up_to_ms))

    def push(self, element: bytes) -> None:
        self.r.rpush(self.ALL[self.PART].inbox, element)

    def samples_per_entry(self) -> float:
        return float(self.r.hget(self.ALL[self.PART].limits, "samples_per_entry") or 1)

    def inbox(self) -> int:
        return int(self.r.llen(self.ALL[self.PART].inbox))


def packed(fields: dict[bytes, bytes]) -> bytes:
    """An inbox element as the submit function appends it: one msgpack array of pairs."""
    return msgpack.packb([x for kv in fields.items() for x in kv], use_bin_type=False)


class ClusterHarness(RedisHarness):
    """The Redis broker on a real 3-master Redis Cluster (every key of the model is in one
    slot, so one node serves them all): commands and pipelines go through redis-py's
    cluster client and its routing."""

    name = "cluster"

    def __init__(self, url: str) -> None:
        self.url = url
        self.r = redis.cluster.RedisCluster.from_url(url)
        self.brokers = []

    def settings(self, consumer: str, url: str | None = None) -> WorkerSettings:
        return super().settings(consumer, url).replace(redis_cluster=True)


def open_harness(kind: str, fixture: Callable[[str], Any]) -> Any:
    """The harness of ``kind`` (memory, redis, partitioned, cluster). Redis ones get their
    server from the pytest fixture ``fixture(name)`` returns (``request.getfixturevalue``):
    ``redis_url``, or ``redis_cluster_url`` for the cluster."""
    if kind == "memory":
        return MemoryHarness()
    if kind == "cluster":
        return ClusterHarness(fixture("redis_cluster_url"))
    return (RedisHarness if kind == "redis" else PartitionedHarness)(fixture("redis_url"))
