"""The SDK's reply reader on a Redis Cluster with one master down (``cluster-require-full-
coverage no``) while one of the client's requests waits on that master's partition: the
replies of the other partitions still come. Before, the reader's one pipelined read over
every slot failed as a whole, and no reply reached the client until the master was back
(a healthy partition's result timed out after 30 s)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from redis.cluster import RedisCluster

from headrace.client import AsyncClient, Client
from headrace.client.keys import ModelKeys, partition_keys, partition_of, registry_key
from headrace.client.results import Result, encode_result
from tests.support.redis_cluster import RedisClusterProcs

pytestmark = pytest.mark.timeout(120)
P = 3
X = {"x": np.ones(4, np.float32)}


@dataclass
class DeadShard:
    cluster: RedisClusterProcs
    rc: RedisCluster
    keys: list[ModelKeys]
    victim: int  # the master to stop
    dead: int  # a partition on it
    healthy: int  # a partition on a master that stays up

    def rid(self, partition: int, prefix: str) -> str:
        return next(f"{prefix}{i}" for i in range(10_000) if partition_of(f"{prefix}{i}", P) == partition)

    def answer_soon(self, client_id: str, rid: str) -> None:
        """Write ``rid``'s result as a worker would, 50 ms from now."""
        def write() -> None:
            time.sleep(0.05)
            self.rc.xadd(self.keys[self.healthy].reply(client_id), encode_result(Result(rid, "ok", {"y": X["x"]})))
        threading.Thread(target=write, daemon=True).start()


@pytest.fixture
def shard() -> Iterator[DeadShard]:
    with RedisClusterProcs(3, node_timeout_ms=1000, full_coverage=False) as cluster:
        keys = partition_keys("headrace", "affine", P)
        owners = cluster.place([k.requests for k in keys])
        rc = RedisCluster.from_url(cluster.url)
        ports = [n.port for n in cluster.nodes]
        # the master to stop: neither the clients' startup node (0) nor the registry's
        victim = next(i for i in (1, 2) if ports[i] != rc.get_node_from_key(registry_key("headrace")).port)
        try:
            yield DeadShard(cluster, rc, keys, victim, owners.index(victim),
                            next(p for p in range(P) if owners[p] != victim))
        finally:
            rc.close()


def test_sync_client_gets_the_healthy_partitions_replies(shard: DeadShard) -> None:
    with Client(shard.cluster.url, redis_cluster=True, partitions=P, timeout_s=30, require_registered=False) as c:
        c.submit("affine", X, request_id=shard.rid(shard.dead, "d"))  # stays in flight
        shard.cluster.nodes[shard.victim].kill()
        time.sleep(2.5)  # the other masters mark it failed
        waits = []
        for i in range(4):
            ticket = c.submit("affine", X, request_id=shard.rid(shard.healthy, f"h{i}_"))
            shard.answer_soon(c.client_id, ticket.request_id)
            t0 = time.monotonic()
            assert c.result(ticket, timeout_s=20).ok
            waits.append(time.monotonic() - t0)
    assert sorted(waits)[len(waits) // 2] < 1.0, waits


def test_async_client_gets_the_healthy_partitions_replies(shard: DeadShard) -> None:
    async def go() -> list[float]:
        async with AsyncClient(shard.cluster.url, redis_cluster=True, partitions=P, timeout_s=30,
                               require_registered=False) as c:
            await c.submit("affine", X, request_id=shard.rid(shard.dead, "d"))
            shard.cluster.nodes[shard.victim].kill()
            await asyncio.sleep(2.5)
            waits = []
            for i in range(4):
                ticket = await c.submit("affine", X, request_id=shard.rid(shard.healthy, f"h{i}_"))
                shard.answer_soon(c.client_id, ticket.request_id)
                t0 = time.monotonic()
                assert (await c.result(ticket, timeout_s=20)).ok
                waits.append(time.monotonic() - t0)
            return waits

    waits = asyncio.run(go())
    assert sorted(waits)[len(waits) // 2] < 1.0, waits

