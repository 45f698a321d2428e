"""One master of a Redis Cluster run with ``cluster-require-full-coverage no`` is down while
a partitioned model takes traffic on the partitions of the other masters: those requests are
answered, exactly once, none dead-lettered, without waiting out the worker's backoff.
Before, a read that met the down partition dropped what the healthy partitions had just
delivered; those entries came back after each lease and were dropped again until the worker
dead-lettered them as poison. And the failed partition's error made the relay and read
loops back off while the healthy partitions' requests waited."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from redis.cluster import RedisCluster

from headrace.client import Client
from headrace.client.keys import partition_keys, partition_of, registry_key
from tests.support.polling import poll_until
from tests.support.procs import WorkerProc
from tests.support.redis_cluster import RedisClusterProcs

P = 3
DOWN_S = 12.0


@pytest.mark.timeout(180)
def test_a_master_down_costs_nothing_on_the_partitions_of_the_others(tmp_path: Path) -> None:
    with RedisClusterProcs(3, node_timeout_ms=1000, full_coverage=False) as cluster:
        owners = cluster.place([k.requests for k in partition_keys("headrace", "affine", P)])
        rc = RedisCluster.from_url(cluster.url)
        ports = [n.port for n in cluster.nodes]
        # down: a master other than the client's startup node and the registry's
        victim = next(i for i in (1, 2) if ports[i] != rc.get_node_from_key(registry_key("headrace")).port)
        healthy = [p for p in range(P) if owners[p] != victim]
        worker = WorkerProc(cluster.url, tmp_path / "worker.log", "--partitions", str(P), "--redis-cluster",
                            "--block-ms", "100", "--lease-s", "2", "--max-deliveries", "3")
        try:
            poll_until(lambda: rc.hget(registry_key("headrace"), "affine") or not worker.alive, 60, 0.1)
            outage = threading.Thread(target=cluster.nodes[victim].restart, kwargs={"crash": True, "down_s": DOWN_S})
            outage.start()
            time.sleep(2.0)  # the masters mark it failed after node_timeout
            ids = [f"r{i}" for i in range(2000) if partition_of(f"r{i}", P) in healthy][:24]
            with Client(cluster.url, redis_cluster=True, partitions=P, timeout_s=60) as client:
                t0 = time.monotonic()
                answers, waits = {}, []
                for rid in ids[:8]:  # one at a time: each waits for the worker while the master is down
                    t = time.monotonic()
                    answers[rid] = client.result(client.submit(
                        "affine", {"x": np.full(4, float(rid[1:]), np.float32)}, request_id=rid), timeout_s=60)
                    waits.append(time.monotonic() - t)
                # Before, a failed partition's error made the relay and read loops back off
                # (up to 2 s) while the healthy partitions' requests waited: 1.5-2 s each,
                # against tens of ms now.
                assert sorted(waits)[len(waits) // 2] < 1.0, waits
                assert outage.is_alive(), "measured while the master was down"
                for burst in (ids[8:16], ids[16:]):  # a backlog: reads take several partitions' entries at once
                    tickets = {rid: client.submit("affine", {"x": np.full(4, float(rid[1:]), np.float32)},
                                                  request_id=rid) for rid in burst}
                    answers.update({rid: client.result(t, timeout_s=60) for rid, t in tickets.items()})
                during = time.monotonic() - t0
            outage.join()
            assert all(r.ok for r in answers.values()), [(r.code, r.message) for r in answers.values() if not r.ok]
            assert {rid: float(r.outputs["y"][0]) for rid, r in answers.items()} == {
                rid: 2.0 * float(rid[1:]) + 1 for rid in ids}
            dlq = sum(int(rc.xlen(partition_keys("headrace", "affine", P)[p].dlq) or 0) for p in healthy
                      if rc.exists(partition_keys("headrace", "affine", P)[p].dlq))
            assert dlq == 0, f"{dlq} healthy requests dead-lettered; worker log:\n{worker.log()[-3000:]}"
            assert during < 120, during
            assert worker.alive, worker.log()[-3000:]
        finally:
            worker.kill()
            rc.close()
