"""A master of the Redis Cluster crashes under a partitioned model and comes back (AOF):
the worker, which reads a partition on every master, backs off instead of dying, and
answers everything sent after the master is back, exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from redis.cluster import RedisCluster

from headrace.client import Client
from headrace.client.keys import partition_keys, registry_key
from tests.support.polling import poll_until
from tests.support.procs import WorkerProc
from tests.support.redis_cluster import RedisClusterProcs

P = 3


def _items(n: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.full(4, i, np.float32)} for i in range(n)]


def _answered_once(url: str, client_id: str, n: int) -> None:
    with Client(url, redis_cluster=True, partitions=P, client_id=client_id, timeout_s=60) as client:
        results = list(client.map("affine", _items(n), chunk_size=1))  # one entry per item: the ledger counts entries
        assert [float(r.outputs["y"][0]) for r in results] == [2.0 * i + 1 for i in range(n)]
        rc = RedisCluster.from_url(url)
        try:
            added = sum(int(rc.xinfo_stream(k.reply(client_id))["entries-added"])
                        for k in partition_keys("headrace", "affine", P) if rc.exists(k.reply(client_id)))
        finally:
            rc.close()
        assert added == n, f"{added} results written for {n} requests"


@pytest.mark.timeout(180)
def test_a_master_crash_does_not_stop_a_partitioned_worker(tmp_path: Path) -> None:
    with RedisClusterProcs(3, node_timeout_ms=1000, appendonly=True) as cluster:
        owners = cluster.place([k.requests for k in partition_keys("headrace", "affine", P)])
        assert sorted(owners) == [0, 1, 2], "one partition per master"
        worker = WorkerProc(cluster.url, tmp_path / "worker.log", "--partitions", str(P), "--redis-cluster",
                            "--block-ms", "100", "--lease-s", "2")
        try:
            rc = RedisCluster.from_url(cluster.url)
            try:
                poll_until(lambda: rc.hget(registry_key("headrace"), "affine") or not worker.alive, 60, 0.1)
            except AssertionError:
                raise AssertionError(f"the worker never registered; its log:\n{worker.log()[-3000:]}") from None
            rc.close()
            _answered_once(cluster.url, "before", 60)
            cluster.nodes[1].restart(crash=True, down_s=3.0)  # its partition's slot is down meanwhile
            cluster.wait_ok(60)
            time.sleep(2.0)
            assert worker.alive, worker.log()[-3000:]
            _answered_once(cluster.url, "after", 90)
            assert worker.alive, worker.log()[-3000:]
            log = worker.log()
            assert "Redis unreachable" in log or "cluster is down" in log.lower(), "the worker met the outage"
        finally:
            worker.kill()
