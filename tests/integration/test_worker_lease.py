"""A batch that outlives the lease is not stolen: its worker refreshes the lease while the
model runs, so another worker's XAUTOCLAIM leaves it alone and nothing runs twice."""

from __future__ import annotations

import time

import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.workers.backends.fake import AffineServable
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.worker import Collector, affine_request, consumers, pending_count, produce, wait_until


@pytest.mark.timeout(60)
def test_long_batch_is_not_stolen_or_run_twice(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    base = WorkerSettings(model="affine", redis_url=redis_url, max_batch=8, block_ms=20, lease_s=0.5,
                          max_wait_ms=1)
    slow_sv, fast_sv = AffineServable(delay_ms=2500), AffineServable()  # 5x the lease
    slow = WorkerThread(base.replace(consumer="slow"), slow_sv).start()
    fast: WorkerThread | None = None
    try:
        produce(r, keys, [affine_request(f"r{i}", float(i), reply) for i in range(8)])
        wait_until(lambda: len(slow_sv.batches) == 1, timeout_s=10)  # the slow batch is in the model
        fast = WorkerThread(base.replace(consumer="fast"), fast_sv).start()  # claims every lease_s / 2
        time.sleep(1.2)  # > 2 lease periods with the batch still running
        assert int(consumers(r, keys)["slow"]["pending"]) == 8
        assert int(consumers(r, keys)["slow"]["idle"]) < 500  # refreshed, never idle past the lease
        results = Collector(r, reply).wait_for(8, timeout_s=20)
        assert sorted(res.request_id for res in results) == sorted(f"r{i}" for i in range(8))
        assert all(res.ok and res.timings.worker == "slow" for res in results)
    finally:
        slow.stop(timeout_s=20)
        if fast is not None:
            fast.stop(timeout_s=20)
    assert slow_sv.invocations == {f"r{i}": 1 for i in range(8)}
    assert not fast_sv.invocations, "the other worker stole and re-ran entries"
    assert pending_count(r, keys) == 0


@pytest.mark.timeout(30)
async def test_refresh_never_takes_back_an_entry_claimed_by_another_consumer(redis_url: str) -> None:
    s = WorkerSettings(model="affine", redis_url=redis_url, lease_s=0.1)
    a, b = RedisBroker(s.replace(consumer="a")), RedisBroker(s.replace(consumer="b"))
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    try:
        await a.ensure_group()
        produce(r, keys, [affine_request("r0", 1.0, keys.reply("c"))])
        (entry,) = await a.read(10, 10)
        assert await a.refresh_lease([entry.entry_id]) == [entry.entry_id]
        time.sleep(0.15)
        claimed = await b.claim_abandoned(100, 10)
        assert [(e.entry_id, e.deliveries) for e in claimed] == [(entry.entry_id, 2)]
        assert await a.refresh_lease([entry.entry_id]) == []  # a lost it and must not steal it back
        owner = r.xpending_range(keys.requests, keys.group, min="-", max="+", count=10)
        assert [(p["consumer"], p["times_delivered"]) for p in owner] == [(b"b", 2)]
        assert await b.refresh_lease([entry.entry_id]) == [entry.entry_id]
        owner = r.xpending_range(keys.requests, keys.group, min="-", max="+", count=10)
        assert owner[0]["times_delivered"] == 2  # refreshing does not count as a delivery
    finally:
        await a.close()
        await b.close()
