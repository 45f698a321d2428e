"""A Redis that comes back empty (restarted without persistence, or an operator's
``FUNCTION FLUSH``) has lost the headrace function library: the worker's relay step loads it
again and goes on, as a lost consumer group is made again, instead of backing off forever
on "Function not found"."""

from __future__ import annotations

import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.settings import WorkerSettings
from tests.support.broker_harness import packed, req

pytestmark = pytest.mark.timeout(30)


async def test_the_relay_loads_a_lost_function_library_again(private_redis: EmbeddedRedis) -> None:
    broker = RedisBroker(WorkerSettings(model="affine", redis_url=private_redis.url, submit_mode="strict"))
    r = redis.Redis.from_url(private_redis.url)
    try:
        await broker.ensure_group()
        r.function_flush()
        assert r.function_list() == []
        r.rpush(ModelKeys("headrace", "affine").inbox, packed(req("lost-lib")))
        step = await broker.relay(10)
        assert (step.added, step.dead_lettered, step.left) == (1, 0, 0)
        assert r.function_list(), "the library is loaded again"
        assert r.xlen(ModelKeys("headrace", "affine").requests) == 1
    finally:
        await broker.close()
        r.close()
