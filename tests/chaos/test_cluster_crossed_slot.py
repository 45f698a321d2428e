"""A Redis Cluster whose masters disagree on a partition's slot (maps crossed, as hand-typed
bare ``CLUSTER SETSLOT ... NODE`` calls can leave them): a partitioned worker neither dies
nor hides why it cannot serve that partition. Redis serves the other slots meanwhile, and
so does the worker: it registers and answers the partitions of the agreed slots, and a
submit to the crossed one fails at once with an error that names the crossed maps (nothing
is queued there). ``headrace partitions place`` repairs the slot, and the worker then
serves that partition too, by itself (its group is made by its first read there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from redis.cluster import RedisCluster, key_slot

from headrace.client import Client
from headrace.client.errors import HeadraceError
from headrace.client.keys import partition_keys, registry_key
from headrace.cluster.cli.main import main
from tests.support.polling import poll_until
from tests.support.procs import WorkerProc
from tests.support.redis_cluster import RedisClusterProcs, affine_x, ids_on

P = 3




@pytest.mark.timeout(180)
def test_crossed_slot_maps_are_reported_then_repaired_and_the_worker_starts(tmp_path: Path) -> None:
    with RedisClusterProcs(3, node_timeout_ms=1000) as cluster:
        keys = [k.requests for k in partition_keys("headrace", "affine", P)]
        owners = cluster.place(keys)
        epochs = cluster.epochs()
        bad = owners.index(epochs.index(max(epochs)))
        crossed = key_slot(keys[bad].encode())
        cluster.cross(crossed)
        good = [p for p in range(P) if key_slot(keys[p].encode()) != crossed]
        assert good, owners

        worker = WorkerProc(cluster.url, tmp_path / "worker.log", "--partitions", str(P), "--redis-cluster",
                            "--block-ms", "100")
        try:
            poll_until(lambda: "masters disagree" in worker.log() or not worker.alive, 60, 0.2,
                       "the worker's log names the crossed maps")
            assert worker.alive, worker.log()[-3000:]
            rc = RedisCluster.from_url(cluster.url)
            try:
                poll_until(lambda: rc.hget(registry_key("headrace"), "affine") or not worker.alive, 60, 0.1,
                           "the worker registers and serves the agreed partitions")
            finally:
                rc.close()
            late = ids_on([bad], 4, P)
            with Client(cluster.url, redis_cluster=True, partitions=P, timeout_s=60) as client:
                served = {rid: client.result(client.submit("affine", affine_x(rid), request_id=rid), timeout_s=30)
                          for rid in ids_on(good, 6, P)}
                with pytest.raises(HeadraceError, match="masters disagree"):
                    client.submit("affine", affine_x(late[0]), request_id=late[0])
            assert {rid: float(r.outputs["y"][0]) for rid, r in served.items()} == {
                rid: 2.0 * float(rid[1:]) + 1 for rid in served}

            shown = CliRunner().invoke(main, ["--redis-url", cluster.url, "partitions", "show", "affine",
                                              "--partitions", str(P)], env={"COLUMNS": "200"})
            assert shown.exit_code == 0 and "masters disagree" in shown.output, shown.output
            res = CliRunner().invoke(main, ["--redis-url", cluster.url, "partitions", "place", "affine",
                                            "--partitions", str(P)], env={"COLUMNS": "200"})
            assert res.exit_code == 0 and "moved (repair)" in res.output, res.output
            views = [cluster.slot_owners(i, [crossed]) for i in range(3)]
            assert views[0] == views[1] == views[2], views

            with Client(cluster.url, redis_cluster=True, partitions=P, timeout_s=60) as client:
                results = list(client.map("affine", [{"x": np.full(4, i, np.float32)} for i in range(30)],
                                          chunk_size=1))
                assert [float(r.outputs["y"][0]) for r in results] == [2.0 * i + 1 for i in range(30)]
                answered = {rid: client.result(client.submit("affine", affine_x(rid), request_id=rid), timeout_s=30)
                            for rid in late}
            assert {rid: float(r.outputs["y"][0]) for rid, r in answered.items()} == {
                rid: 2.0 * float(rid[1:]) + 1 for rid in late}
            assert worker.alive, worker.log()[-3000:]
        finally:
            worker.kill()
