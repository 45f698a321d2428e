"""Redis restarts and data loss do not end the loop: it backs off, reports unhealthy,
resumes, and answers what is queued afterwards."""

from __future__ import annotations

import time

import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.backends.fake import AffineServable
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.worker import Collector, affine_request, produce, wait_until


@pytest.mark.timeout(60)
def test_worker_rides_out_a_redis_restart(private_redis: EmbeddedRedis) -> None:
    url = private_redis.url
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    sv = AffineServable()
    s = WorkerSettings(model="affine", redis_url=url, consumer="w", block_ms=50, lease_s=1, max_wait_ms=1)
    wt = WorkerThread(s, sv).start()
    try:
        r = redis.Redis.from_url(url)
        produce(r, keys, [affine_request(f"a{i}", 1.0, reply) for i in range(20)])
        Collector(r, reply).wait_for(20, timeout_s=10)
        assert wt.healthy()
        r.close()
        private_redis.kill()  # crash (AOF with fsync always keeps the data)
        wait_until(lambda: not wt.healthy(), timeout_s=15)
        assert wt.alive
        time.sleep(0.5)
        private_redis.start()
        wait_until(wt.healthy, timeout_s=20)
        r = redis.Redis.from_url(url)
        produce(r, keys, [affine_request(f"b{i}", 2.0, reply) for i in range(20)])
        results = Collector(r, reply).wait_for(40, timeout_s=20)
        got = {res.request_id for res in results}
        assert got == {f"a{i}" for i in range(20)} | {f"b{i}" for i in range(20)}
        assert len(results) == 40 and all(res.ok for res in results)
    finally:
        wt.stop(timeout_s=20)


@pytest.mark.timeout(60)
def test_worker_recreates_its_group_after_redis_lost_everything(redis_url: str) -> None:
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    s = WorkerSettings(model="affine", redis_url=redis_url, consumer="w", block_ms=50, lease_s=1, max_wait_ms=1)
    wt = WorkerThread(s, AffineServable()).start()
    try:
        r = redis.Redis.from_url(redis_url)
        produce(r, keys, [affine_request("before", 1.0, reply)])
        Collector(r, reply).wait_for(1, timeout_s=10)
        r.flushall()  # e.g. a restart without persistence: stream and group are gone
        produce(r, keys, [affine_request("after", 3.0, reply)])  # a producer recreates the stream
        (res,) = Collector(r, reply).wait_for(1, timeout_s=20)
        assert res.request_id == "after" and res.ok
        assert wt.healthy()
    finally:
        wt.stop(timeout_s=20)
