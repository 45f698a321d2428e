"""A partition slot whose masters disagree on its owner (maps crossed, see
``headrace.cluster.ops.placement``): redis-py gives up with a bare ``ClusterError: TTL
exhausted.``; the worker's broker and the SDK turn it into a BrokerError that says what it
means and how to repair it (the worker's loops back off on BrokerError instead of dying)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from redis.cluster import key_slot

from headrace.client import Client
from headrace.client import errors as E
from headrace.client.keys import partition_keys, partition_of
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.settings import WorkerSettings
from tests.support.redis_cluster import RedisClusterProcs

pytestmark = pytest.mark.timeout(120)
P = 3


def test_a_crossed_slot_is_a_broker_error_that_names_the_cause_in_the_worker_and_the_sdk() -> None:
    with RedisClusterProcs(3, node_timeout_ms=1000) as cluster:
        keys = partition_keys("headrace", "affine", P)
        owners = cluster.place([k.requests for k in keys])
        epochs = cluster.epochs()
        p = owners.index(epochs.index(max(epochs)))
        cluster.cross(key_slot(keys[p].requests.encode()))

        broker = RedisBroker(WorkerSettings(model="affine", redis_url=cluster.url, redis_cluster=True), keys=keys[p])

        async def worker_side() -> None:
            try:
                with pytest.raises(E.BrokerError, match="masters disagree") as info:
                    await broker.backlog()
                assert "headrace partitions place" in str(info.value)
            finally:
                await broker.close()

        asyncio.run(worker_side())

        request_id = next(f"r{i}" for i in range(1000) if partition_of(f"r{i}", P) == p)
        with Client(cluster.url, redis_cluster=True, partitions=P, timeout_s=5, require_registered=False) as client:
            with pytest.raises(E.BrokerError, match="masters disagree"):
                client.submit("affine", {"x": np.ones(4, np.float32)}, request_id=request_id)
