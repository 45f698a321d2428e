"""The broker contract: the same scenarios against the in-memory broker (the unit tests'
fake) and the Redis broker, so the fake cannot drift from what the worker meets in
production (reads sized to a byte budget, oversize entries truncated, UNWRITABLE replies,
refused commits, outages on every call, delivery counts, trimming, relaying the inbox)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import pytest
import redis

from headrace.client import errors as E
from headrace.client.keys import ModelKeys, partition_keys
from headrace.client.protocol import now_ms
from headrace.workers.broker.base import Broker, CommitRejected, RelayStep
from headrace.workers.broker.partitioned import PartitionedBroker, unwrap, wrap
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.pipeline import ops
from headrace.workers.pipeline.entry import Entry
from headrace.workers.pipeline.ops import DUPLICATE, UNWRITABLE, WRITTEN, Ack, DeadLetterOp, Reply
from headrace.workers.pipeline.stats import BatchStats
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


@pytest.fixture(params=["memory", "redis", "partitioned"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    harness: Any = MemoryHarness() if request.param == "memory" else (
        RedisHarness if request.param == "redis" else PartitionedHarness)(request.getfixturevalue("redis_url"))
    yield harness
    await harness.close()


@pytest.fixture
def idle() -> Iterator[Any]:
    async def wait(seconds: float) -> None:
        await asyncio.sleep(seconds)

    yield wait


@pytest.mark.timeout(20)
async def test_read_delivers_new_entries_once_oldest_first(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    await b.ensure_group()  # idempotent
    ids = [h.add(req(f"r{i}")) for i in range(3)]
    got = await b.read(10, 10)
    assert [e.entry_id for e in got] == ids and all(e.deliveries == 1 and not e.truncated for e in got)
    assert got[0].fields[b"id"] == b"r0" and got[0].size_bytes == sum(len(k) + len(v) for k, v in req("r0").items())
    assert await b.read(10, 10) == []
    assert set(h.pending()) == set(ids)


@pytest.mark.timeout(20)
async def test_a_read_that_waits_returns_one_entry(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()

    async def later() -> None:
        await asyncio.sleep(0.05)
        for i in range(3):
            h.add(req(f"w{i}"))

    task = asyncio.ensure_future(later())
    got = await b.read(10, 2000)
    await task
    assert [e.fields[b"id"] for e in got] == [b"w0"]
    assert [e.fields[b"id"] for e in await b.read(10, 10)] == [b"w1", b"w2"]


@pytest.mark.timeout(20)
async def test_reads_are_sized_to_the_budget_and_an_oversize_entry_comes_alone_truncated(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    small = [h.add(req(f"s{i}", pad=500)) for i in range(4)]
    big = h.add(req("big", pad=MAX_ENTRY + 1, extra=b"y" * 10))
    after = h.add(req("after"))
    one = len(b"".join(k + v for k, v in req("s0", pad=500).items()))
    got = await b.read(10, 10, budget_bytes=2 * one)
    assert [e.entry_id for e in got] == small[:2]
    got = await b.read(10, 10, budget_bytes=1)  # the first entry always fits
    assert [e.entry_id for e in got] == small[2:3]
    got = await b.read(10, 10, budget_bytes=10**9)
    assert [e.entry_id for e in got] == small[3:4], "an oversize entry is never read with others"
    (trunc,) = await b.read(10, 10, budget_bytes=10**9)
    assert trunc.entry_id == big and trunc.truncated and trunc.field_count == 5
    assert trunc.size_bytes > MAX_ENTRY and set(trunc.fields) == {b"v", b"id", b"reply_to"}
    assert [e.entry_id for e in await b.read(10, 10)] == [after]
    assert big in h.pending(), "the oversize entry is delivered (pending) like any other"


@pytest.mark.timeout(20)
async def test_commit_writes_a_result_once_and_acks(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    e1, e2 = h.add(req("same")), h.add(req("same"))
    await b.read(10, 10)
    out = await b.commit([Reply(e1, "same", REPLY, result_fields("same"))],
                         [BatchStats("a", 1, 1, 0, 1.5, (2.0,))])
    assert out == [WRITTEN]
    assert await b.commit([Reply(e2, "same", REPLY, result_fields("same")), Ack(e2)]) == [DUPLICATE, DUPLICATE]
    assert len(h.replies(REPLY)) == 1 and h.pending() == {}
    assert await b.answered(["same", "other"]) == [True, False]


@pytest.mark.timeout(20)
async def test_cancel_markers_are_read_per_request_id(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    h.cancel("gone", 1_700_000_000_123)
    assert await b.cancel_marks(["gone", "kept"]) == [1_700_000_000_123, 0]
    assert await b.cancel_marks([]) == []


@pytest.mark.timeout(20)
async def test_a_reply_to_a_key_of_another_type_is_unwritable_and_dead_lettered(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    bad_key = KEYS.reply("string")
    h.wrong_type(bad_key)
    eid = h.add(req("u"))
    await b.read(10, 10)
    assert await b.commit([Reply(eid, "u", bad_key, result_fields("u"))]) == [UNWRITABLE]
    (dead,) = h.dlq()
    assert dead[b"id"] == b"u" and dead[ops.DLQ_CODE] == E.INTERNAL_ERROR.encode()
    assert dead[ops.DLQ_ENTRY_ID] == h.stream_id(eid).encode() and h.pending() == {}
    assert await b.answered(["u"]) == [False], "no marker: a replay may answer it"


@pytest.mark.timeout(20)
async def test_dead_letters_keep_bounded_fields_and_tell_the_producer(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    wide = req("wide", **{f"f{i}": b"v" for i in range(4000)})
    e1, e2 = h.add(wide), h.add(req("told"))
    got = {e.entry_id: e for e in await b.read(10, 10)}
    reply = result_fields("told")
    out = await b.commit([
        DeadLetterOp(e1, got[e1].fields, "why", E.DECODE_ERROR, 1, entry_bytes=got[e1].size_bytes,
                     entry_fields=got[e1].field_count),
        DeadLetterOp(e2, got[e2].fields, "poison", E.MODEL_ERROR, 3, "told", REPLY, reply)])
    assert out == [WRITTEN, WRITTEN]
    first, second = h.dlq()
    assert len(first) <= ops.DLQ_MAX_FIELDS + 8 and first[ops.DLQ_ENTRY_FIELDS] == b"4004"
    assert int(first[ops.DLQ_DROPPED_FIELDS]) == 4004 - ops.DLQ_MAX_FIELDS
    assert second[b"body"] == req("told")[b"body"] and second[ops.DLQ_DELIVERIES] == b"3"
    assert h.replies(REPLY) == [reply] and h.pending() == {}


@pytest.mark.timeout(20)
async def test_a_commit_the_queue_refuses_raises_commit_rejected(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    h.wrong_type(h.dlq_key)
    e1, e2 = h.add(req("fine")), h.add(req("doomed"))
    got = {e.entry_id: e for e in await b.read(10, 10)}
    with pytest.raises(CommitRejected):
        await b.commit([Reply(e1, "fine", REPLY, result_fields("fine")),
                        DeadLetterOp(e2, got[e2].fields, "x", E.DECODE_ERROR, 1)])
    # What ran before the refused op stays (a script is not rolled back), with its marker:
    assert await b.commit([Reply(e1, "fine", REPLY, result_fields("fine"))]) == [DUPLICATE]
    assert len(h.replies(REPLY)) == 1 and set(h.pending()) == {e2}


@pytest.mark.timeout(20)
async def test_claim_takes_idle_entries_with_their_delivery_count_and_leases_hold(h: Any, idle: Any) -> None:
    a, b = h.broker("a"), h.broker("b")
    await a.ensure_group()
    ids = [h.add(req(f"c{i}")) for i in range(3)]
    await a.read(10, 10)
    assert await b.claim_abandoned(200, 10) == []
    await idle(0.3)
    assert await a.refresh_lease([ids[0]]) == [ids[0]]  # a keeps ids[0]
    claimed = await b.claim_abandoned(200, 10)
    assert [(e.entry_id, e.deliveries) for e in claimed] == [(ids[1], 2), (ids[2], 2)]
    assert await a.refresh_lease(ids) == [ids[0]], "a lease is never refreshed back from its new owner"
    assert h.pending()[ids[1]] == ("b", 2)


@pytest.mark.timeout(20)
async def test_claims_are_sized_and_skip_nothing(h: Any, idle: Any) -> None:
    a, b = h.broker("a"), h.broker("b")
    await a.ensure_group()
    ids = [h.add(req(f"k{i}", pad=500)) for i in range(3)]
    big = h.add(req("kbig", pad=MAX_ENTRY + 1))
    for _ in range(4):
        await a.read(10, 10)
    await idle(0.3)
    first = await b.claim_abandoned(200, 10, budget_bytes=1)
    assert [e.entry_id for e in first] == ids[:1]
    rest = await b.claim_abandoned(200, 10, budget_bytes=10**9)
    assert [e.entry_id for e in rest] == [*ids[1:], big]
    assert rest[-1].truncated and rest[-1].deliveries == 2 and b"body" not in rest[-1].fields


@pytest.mark.timeout(20)
async def test_release_hands_back_with_the_delivery_undone(h: Any, idle: Any) -> None:
    a, b = h.broker("a"), h.broker("b")
    await a.ensure_group()
    eid = h.add(req("h"))
    (entry,) = await a.read(10, 10)
    assert await b.release([entry], 60_000) == [], "only the owner hands back"
    assert await a.release([entry], 60_000) == [eid]
    (again,) = await b.claim_abandoned(1000, 10)
    assert again.entry_id == eid and again.deliveries == 1


@pytest.mark.timeout(20)
async def test_trim_keeps_pending_and_unread_and_backlog_counts_them(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    ids = [h.add(req(f"t{i}")) for i in range(5)]
    await b.read(3, 10)
    await b.commit([Ack(ids[0]), Ack(ids[1])])
    assert await b.trim() == 2
    assert h.length() == 3
    backlog = await b.backlog()
    assert (backlog.lag, backlog.pending) == (2, 1)


@pytest.mark.timeout(20)
async def test_samples_per_entry_is_published_at_least_one(h: Any) -> None:
    b = h.broker()
    await b.publish_samples_per_entry(31.5)
    assert h.samples_per_entry() == 31.5
    await b.publish_samples_per_entry(0.2)  # below one sample per entry: one
    assert h.samples_per_entry() == 1.0


@pytest.mark.timeout(20)
async def test_consumers_are_deleted_only_when_they_own_nothing(h: Any) -> None:
    a, b = h.broker("a"), h.broker("b")
    await a.ensure_group()
    h.add(req("o1"))
    (mine,) = await a.read(1, 10)
    h.add(req("o2"))
    (theirs,) = await b.read(1, 10)
    await b.commit([Ack(theirs.entry_id)])
    assert await a.delete_idle_consumers(0, only="a") == []
    assert await a.delete_idle_consumers(0) == ["b"]
    assert set(h.pending()) == {mine.entry_id}


@pytest.mark.timeout(30)
async def test_every_call_raises_broker_error_when_the_queue_is_unreachable(h: Any) -> None:
    b = h.unreachable()
    calls = [b.ensure_group(), b.read(1, 10), b.claim_abandoned(1, 1), b.refresh_lease(["1-0"]), b.release([Entry("1-0", {})], 1),
             b.answered(["x"]), b.cancel_marks(["x"]), b.commit([Ack("1-0")]), b.trim(), b.backlog(), b.heartbeat({"version": "1"}),
             b.unregister(), b.delete_idle_consumers(0), b.ping(), b.relay(1), b.wait_inbox(10),
             b.publish_samples_per_entry(2.0)]
    for call in calls:
        with pytest.raises(E.BrokerError):
            await call
    await b.close()  # never raises


def packed(fields: dict[bytes, bytes]) -> bytes:
    """An inbox element as the submit function appends it: one msgpack array of pairs."""
    return msgpack.packb([x for kv in fields.items() for x in kv], use_bin_type=False)


@pytest.mark.timeout(20)
async def test_relay_moves_the_oldest_inbox_elements_into_the_stream_in_order(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    assert await b.relay(10) == RelayStep(0, 0, 0)
    for i in range(5):
        h.push(packed(req(f"i{i}")))
    step = await b.relay(3)
    assert step == RelayStep(3, 0, 2) and h.inbox() == 2
    assert (await b.relay(10)).added == 2 and h.inbox() == 0
    got = await b.read(10, 10)
    assert [e.fields[b"id"] for e in got] == [f"i{i}".encode() for i in range(5)]
    assert dict(got[0].fields) == req("i0"), "the entry is the element's fields, nothing added"
    assert h.dlq() == []


@pytest.mark.timeout(20)
async def test_relay_dead_letters_what_breaks_the_entry_bounds_without_its_payload(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    def mp(obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=False)  # strings as msgpack str, as cmsgpack packs them

    bad = {
        b"not msgpack \xc1": "decode_error",
        msgpack.packb([b"v", b"1"], use_bin_type=True): "decode_error",  # bin types: Lua's cmsgpack refuses them
        mp({"v": "1", "id": "m"}): "decode_error",                         # a map, not pairs
        mp([b"v", b"1"]) + mp([b"v", b"1"]): "decode_error",               # two objects
        mp([b"v", b"1", b"id"]): "decode_error",                           # odd
        mp([b"v", 1, b"id", b"x"]): "decode_error",                        # not strings
        mp([b"v", [b"1"], b"id", b"x"]): "decode_error",                   # nested
        mp([b"id", b"a", b"id", b"b"]): "decode_error",                    # a name twice
        mp([b"x" * 65, b"1"]): "decode_error",                             # a long name
        mp([x for i in range(17) for x in (f"f{i}".encode(), 1)]): "payload_too_large",  # 17 fields
        packed(req("fat", pad=PAYLOAD)): "payload_too_large",              # all fields > max_payload_bytes
        b"\x91" + mp(b"y" * (4 * PAYLOAD)): "payload_too_large",          # oversize: never decoded
    }
    h.push(packed(req("good-1")))
    for raw in bad:
        h.push(raw)
    h.push(packed(req("good-2")))
    step = await b.relay(100)
    assert step == RelayStep(2, len(bad), 0)
    assert [e.fields[b"id"] for e in await b.read(10, 10)] == [b"good-1", b"good-2"]
    letters = h.dlq()
    assert [d[b"dlq_code"].decode() for d in letters] == list(bad.values())
    assert all(d[b"dlq_entry_id"] == b"inbox" for d in letters)
    assert [int(d[b"dlq_entry_bytes"]) for d in letters] == [len(raw) for raw in bad]
    assert max(len(v) for d in letters for v in d.values()) < 1024, "no payload was copied"


@pytest.mark.timeout(20)
async def test_waiting_for_the_inbox_leaves_the_element_for_any_relay(h: Any) -> None:
    a, other = h.broker("a"), h.broker("b")
    await a.ensure_group()
    assert await a.wait_inbox(20) is False

    async def later() -> None:
        await asyncio.sleep(0.05)
        h.push(packed(req("w")))

    task = asyncio.ensure_future(later())
    assert await a.wait_inbox(2000) is True
    await task
    assert h.inbox() == 1, "the wait took nothing"
    # The waiting worker may die now: any other relays the element, once.
    assert await other.relay(10) == RelayStep(1, 0, 0)
    assert await a.relay(10) == RelayStep(0, 0, 0)
    assert [e.fields[b"id"] for e in await a.read(10, 10)] == [b"w"]


@pytest.mark.timeout(20)
async def test_wait_and_relay_moves_what_arrives_during_the_wait(h: Any) -> None:
    a = h.broker("a")
    await a.ensure_group()
    assert await a.wait_and_relay(10, 20) == RelayStep(0, 0, 0), "a wait that times out moves nothing"

    async def later() -> None:
        await asyncio.sleep(0.05)
        h.push(packed(req("w1")))
        h.push(packed(req("w2")))

    task = asyncio.ensure_future(later())
    step = await a.wait_and_relay(10, 2000)
    await task
    assert step.added >= 1 and step.dead_lettered == 0
    rest = await a.relay(10)  # whatever arrived after the step's relay, the next one takes
    assert step.added + rest.added == 2 and rest.left == 0 and h.inbox() == 0
    assert [e.fields[b"id"] for e in await a.read(10, 10)] == [b"w1", b"w2"]


@pytest.mark.timeout(20)
async def test_a_dead_letter_from_wait_and_relay_carries_the_time_it_was_relayed(h: Any) -> None:
    """The pipelined wait and relay is sent before the element arrives: its dead letters
    must still carry the time they were made, not the time the wait began."""
    a = h.broker("a")
    await a.ensure_group()
    pushed: list[int] = []

    async def later() -> None:
        await asyncio.sleep(0.4)
        pushed.append(now_ms())
        h.push(b"\xc1 not msgpack")

    task = asyncio.ensure_future(later())
    step = await a.wait_and_relay(10, 3000)
    await task
    assert step.dead_lettered == 1
    stamped = int(h.dlq()[0][b"dlq_ts_ms"])
    assert pushed[0] - 50 <= stamped <= now_ms() + 50, (stamped, pushed)


@pytest.mark.timeout(20)
async def test_a_relay_that_cannot_add_puts_everything_back_in_order(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    for i in range(3):
        h.push(packed(req(f"p{i}")))
    h.wrong_type(h.requests_key)  # a stream key of another type: every XADD fails
    with pytest.raises(E.BrokerError):
        await b.relay(10)
    assert h.inbox() == 3 and h.dlq() == [], "nothing popped is lost"
