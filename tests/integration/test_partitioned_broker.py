"""What a partitioned broker adds to the broker contract (which it is held to in
tests/integration/test_broker_contract.py): requests spread over partitions by id, reads
that starve no partition, waits on every partition at once, commits grouped per
partition, and entries a wait brought in handed back on close, never lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import numpy as np
import pytest
import redis

from headrace.client.keys import partition_keys, partition_of
from headrace.workers.broker.partitioned import PartitionedBroker, redis_broker, unwrap, wrap
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.pipeline.ops import WRITTEN, Ack, Reply
from headrace.workers.settings import WorkerSettings

pytestmark = pytest.mark.timeout(30)

P = 3
ALL = partition_keys("headrace", "affine", P)


def req(rid: str) -> dict[bytes, bytes]:
    return {b"v": b"1", b"id": rid.encode(), b"reply_to": ALL[partition_of(rid, P)].reply("c").encode(),
            b"body": b"x" * 10}


def rid_on(partition: int, prefix: str = "r") -> str:
    """A request id whose partition is ``partition``."""
    return next(f"{prefix}{i}" for i in range(10_000) if partition_of(f"{prefix}{i}", P) == partition)


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
async def make(redis_url: str) -> AsyncIterator[object]:
    made: list[PartitionedBroker] = []

    def build(consumer: str = "a", block_ms: int = 100) -> PartitionedBroker:
        s = WorkerSettings(model="affine", redis_url=redis_url, consumer=consumer, block_ms=block_ms, partitions=P,
                           lease_s=0.1)
        b = redis_broker(s)
        assert isinstance(b, PartitionedBroker)
        made.append(b)
        return b

    yield build
    for b in made:
        await b.close()


def add(r: redis.Redis, rid: str) -> str:
    p = partition_of(rid, P)
    return wrap(p, r.xadd(ALL[p].requests, req(rid)).decode())  # type: ignore[arg-type,union-attr]


def test_one_partition_is_the_unpartitioned_broker(redis_url: str) -> None:
    b = redis_broker(WorkerSettings(model="affine", redis_url=redis_url))
    assert isinstance(b, RedisBroker) and b.keys.requests == "headrace:{affine}:requests"


async def test_reads_visit_every_partition_and_starve_none(make: object, r: redis.Redis) -> None:
    b = make()  # type: ignore[operator]
    await b.ensure_group()
    busy = [add(r, rid_on(0, f"busy{i}-")) for i in range(40)]
    quiet = [add(r, rid_on(1, "q")), add(r, rid_on(2, "z"))]
    seen: list[str] = []
    for _ in range(3):  # three reads of 5: every partition has had its turn
        seen += [e.entry_id for e in await b.read(5, 10)]
    assert set(quiet) <= set(seen), "the quiet partitions were served while one is busy"
    assert {unwrap(i)[0] for i in seen} == {0, 1, 2}
    while True:
        got = await b.read(100, 10)
        if not got:
            break
        seen += [e.entry_id for e in got]
    assert sorted(seen) == sorted(busy + quiet)


async def test_a_wait_covers_every_partition(make: object, r: redis.Redis) -> None:
    b = make(block_ms=3000)  # type: ignore[operator]
    await b.ensure_group()
    for p in range(P):  # an entry on whichever partition ends the wait at once
        rid = rid_on(p, f"w{p}-")

        async def later(rid: str = rid) -> str:
            await asyncio.sleep(0.1)
            return add(r, rid)

        task = asyncio.ensure_future(later())
        t0 = time.monotonic()
        got = await b.read(10, 3000)
        assert [e.entry_id for e in got] == [await task]
        assert time.monotonic() - t0 < 1.5


async def test_commits_go_to_each_entrys_partition(make: object, r: redis.Redis) -> None:
    b = make()  # type: ignore[operator]
    await b.ensure_group()
    rids = [rid_on(p, f"c{p}-") for p in range(P)]
    ids = [add(r, rid) for rid in rids]
    got = []
    while len(got) < P:
        got += await b.read(10, 10)
    ops = [Reply(i, rid, ALL[partition_of(rid, P)].reply("c"), {b"v": b"1", b"id": rid.encode(), b"status": b"ok"})
           for i, rid in zip(ids, rids, strict=True)]
    assert await b.commit(ops) == [WRITTEN] * P
    for p, rid in enumerate(rids):
        assert r.xlen(ALL[p].reply("c")) == 1 and r.exists(ALL[p].done(rid)) == 1
        assert r.xpending(ALL[p].requests, "workers")["pending"] == 0
    assert await b.answered(rids) == [True] * P
    backlog = await b.backlog()
    assert (backlog.lag, backlog.pending) == (0, 0)


async def test_backlog_adds_up_the_partitions(make: object, r: redis.Redis) -> None:
    b = make()  # type: ignore[operator]
    await b.ensure_group()
    for p in range(P):
        for i in range(p + 1):
            add(r, rid_on(p, f"b{p}{i}-"))
    (entry,) = await b.read(1, 10)
    await b.commit([Ack(entry.entry_id)])
    backlog = await b.backlog()
    assert backlog.lag == 1 + 2 + 3 - 1 and backlog.pending == 0


async def test_entries_a_wait_brought_in_are_handed_back_on_close(make: object, r: redis.Redis,
                                                                  redis_url: str) -> None:
    a = make("a", block_ms=2000)  # type: ignore[operator]
    await a.ensure_group()

    async def burst() -> None:
        await asyncio.sleep(0.1)
        for p in range(P):  # all at once, on every partition
            add(r, rid_on(p, f"h{p}-"))

    task = asyncio.ensure_future(burst())
    first = await a.read(10, 2000)
    await task
    assert len(first) == 1, "a read that waited returns one entry"
    await a.commit([Ack(first[0].entry_id)])
    await asyncio.sleep(0.2)  # the other waits end with theirs
    await a.close()  # hands back what it holds but never handed out
    other = make("b")  # type: ignore[operator]
    claimed = await other.claim_abandoned(50, 10)
    assert len(claimed) == P - 1 and all(e.deliveries == 1 for e in claimed)
    assert first[0].entry_id not in {e.entry_id for e in claimed}


def test_the_autoscaling_policy_adds_up_every_partitions_backlog(r: redis.Redis, redis_url: str) -> None:
    from headrace.cluster.serve.autoscale import LagAutoscalingPolicy

    for p, keys in enumerate(ALL):
        r.xgroup_create(keys.requests, "workers", id="0", mkstream=True)
        for i in range(p + 2):
            add(r, rid_on(p, f"s{p}{i}-"))
    r.xreadgroup("workers", "w", {ALL[1].requests: ">"}, count=1)
    policy = LagAutoscalingPolicy(redis_url=redis_url, model="affine", partitions=P, poll_interval_s=0)
    assert policy.poll() == (2 + 3 + 4 - 1, 1)
    single = LagAutoscalingPolicy(redis_url=redis_url, model="affine", poll_interval_s=0)
    assert single.poll() == (0, 0), "the unpartitioned stream is another one"


def test_the_autoscaling_policy_scales_from_zero_on_requests_waiting_in_the_inboxes(r: redis.Redis,
                                                                                   redis_url: str) -> None:
    """Strict submit mode with no worker running: requests wait in the partitions' inboxes
    (only a worker relays them), so the streams are empty; the policy still asks for
    replicas, and counts multi-sample entries by the samples they carry."""
    from headrace.client import Client
    from headrace.cluster.serve.autoscale import LagAutoscalingPolicy

    with Client(redis_url, require_registered=False, partitions=P) as client:
        for i in range(12):
            client.submit("affine", inputs={"x": np.zeros(4, np.float32)}, request_id=f"z{i}")
    assert sum(r.llen(k.inbox) for k in ALL) == 12 and not any(r.exists(k.requests) for k in ALL)
    policy = LagAutoscalingPolicy(redis_url=redis_url, model="affine", partitions=P, poll_interval_s=0,
                                  target_backlog_per_replica=5)
    assert policy.poll() == (12, 0)
    r.hset(ALL[0].limits, "samples_per_entry", "8.00")
    ctx = SimpleNamespace(current_num_replicas=0, target_num_replicas=0, policy_state={}, aggregated_metrics={})
    desired, state = policy(ctx)
    assert desired == 20 and state["headrace_samples_per_entry"] == 8.0  # 12 entries x 8 / 5 per replica


async def test_status_adds_up_the_partitions_its_workers_report(make: object, r: redis.Redis) -> None:
    from headrace.workers.admin.status import model_status

    b = make("w1")  # type: ignore[operator]
    await b.ensure_group()
    await b.heartbeat({"version": "1"})
    for p in range(P):
        for i in range(2):
            add(r, rid_on(p, f"st{p}{i}-"))
    got = await b.read(4, 10)
    st = model_status(r, "headrace", "affine")
    assert (st.stream_length, st.lag, st.pending) == (2 * P, 2 * P - len(got), len(got))
    assert st.samples_per_entry == 1.0  # nothing published yet
    await b.publish_samples_per_entry(16.5)
    assert model_status(r, "headrace", "affine").samples_per_entry == 16.5
    assert [(c.name, c.pending) for c in st.consumers] == [("w1", len(got))]
    assert st.workers == ("w1",)


async def test_dead_letters_of_every_partition_are_listed_replayed_and_purged(make: object, r: redis.Redis) -> None:
    from headrace.client import errors as E
    from headrace.workers.admin.dlq import dlq_list, dlq_purge, dlq_replay
    from headrace.workers.pipeline.ops import DeadLetterOp

    b = make()  # type: ignore[operator]
    await b.ensure_group()
    await b.heartbeat({"version": "1"})  # the registry says: 3 partitions
    rids = [rid_on(0, "d0-"), rid_on(2, "d2-"), rid_on(2, "e2-")]
    for rid in rids:
        add(r, rid)
    got = []
    while len(got) < 3:
        got += await b.read(10, 10)
    await b.commit([DeadLetterOp(e.entry_id, e.fields, "poison", E.MODEL_ERROR, 3) for e in got])
    listed = dlq_list(r, "headrace", "affine")
    assert sorted(d.request_id for d in listed) == sorted(rids)
    assert {d.dlq_id.split("/")[0] for d in listed} == {"0", "2"}, "ids name their partition"
    one = next(d for d in listed if d.request_id == rids[1])
    assert dlq_replay(r, "headrace", "affine", [one.dlq_id]) == 1
    assert r.xlen(ALL[2].dlq) == 1
    (_, back), = r.xrevrange(ALL[2].requests, count=1)  # type: ignore[misc]
    assert back[b"id"] == rids[1].encode(), "replayed into its own partition's stream"
    assert dlq_purge(r, "headrace", "affine") == 2
    assert dlq_list(r, "headrace", "affine") == []


async def test_an_oversize_entry_of_another_partition_still_comes_alone(redis_url: str, r: redis.Redis) -> None:
    s = WorkerSettings(model="affine", redis_url=redis_url, consumer="a", block_ms=100, partitions=P,
                       max_payload_bytes=1024, memory_budget_bytes=10**7)
    b = redis_broker(s)
    try:
        await b.ensure_group()
        small = add(r, rid_on(0, "sm"))
        big_rid = rid_on(1, "big")
        fields = req(big_rid) | {b"body": b"x" * (s.max_entry_bytes + 10)}
        big = wrap(1, r.xadd(ALL[1].requests, fields).decode())  # type: ignore[arg-type,union-attr]
        first = await b.read(10, 10)
        assert [e.entry_id for e in first] == [small]
        (second,) = await b.read(10, 10)
        assert second.entry_id == big and second.truncated
    finally:
        await b.close()
