"""A model split into partitions, served on a real 3-master Redis Cluster that the tests
start on loopback (tests/support/redis_cluster.py): a real worker process reads every
partition, the SDK spreads requests by id and reads one reply stream per partition, and
the ledger (sent / answered / lost / duplicated) balances."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.cluster import RedisCluster

from headrace.client import Client
from headrace.client.keys import ModelKeys, partition_keys, partition_of, registry_key
from tests.support.procs import WorkerProc
from tests.support.redis_cluster import RedisClusterProcs
from tests.support.worker import wait_until

pytestmark = pytest.mark.timeout(120)

P = 6  # more partitions than masters: each master holds two


@pytest.fixture
def rc(redis_cluster_url: str) -> Iterator[RedisCluster]:
    r = RedisCluster.from_url(redis_cluster_url)
    yield r
    r.close()


@pytest.fixture
def worker(redis_cluster: RedisClusterProcs, redis_cluster_url: str, tmp_path: Path, rc: RedisCluster) -> Iterator[WorkerProc]:
    proc = WorkerProc(redis_cluster_url, tmp_path / "worker.log", "--partitions", str(P), "--redis-cluster",
                      "--max-wait-ms", "2", "--block-ms", "200", "--consumer", "w1")
    try:
        wait_until(lambda: rc.hget(registry_key("headrace"), "affine") or not proc.alive, 60)
        assert proc.alive, proc.log()
        yield proc
    finally:
        proc.kill()


def _added(rc: RedisCluster, key: str) -> int:
    """Entries ever added to stream ``key`` (``entries-added``: deleted ones included)."""
    if not rc.exists(key):
        return 0
    return int(rc.xinfo_stream(key)["entries-added"])


def test_partitions_land_on_every_master(rc: RedisCluster) -> None:
    parts = partition_keys("headrace", "affine", P)
    nodes = {(rc.get_node_from_key(k.requests).port) for k in parts}
    assert len(nodes) == 3, "the 6 partitions spread over the 3 masters"
    for k in parts:  # every key of one partition shares its slot
        assert len({rc.keyslot(x) for x in (k.requests, k.dlq, k.limits, k.done("r"), k.reply("c"), k.cancel("r"))}) == 1


def test_every_request_is_answered_exactly_once_over_the_cluster(rc: RedisCluster, worker: WorkerProc,
                                                                 redis_cluster_url: str) -> None:
    n = 600
    items: list[Any] = [{"x": np.full(4, i, np.float32)} for i in range(n)]
    with Client(redis_cluster_url, redis_cluster=True, partitions=P, client_id="ledger", timeout_s=60) as client:
        results = list(client.map("affine", items, chunk_size=1))  # one entry per item: spread by id
        answered = Counter(r.request_id for r in results)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        for i, r in enumerate(results):
            np.testing.assert_allclose(r.outputs["y"], np.full(4, 2 * i + 1, np.float32))
        parts = partition_keys("headrace", "affine", P)
        written = sum(_added(rc, k.reply("ledger")) for k in parts)
        per_part = [_added(rc, k.requests) for k in parts]
    ledger = {"sent": n, "answered": len(answered), "lost": n - len(answered),
              "duplicated": written - len(answered)}
    assert ledger == {"sent": n, "answered": n, "lost": 0, "duplicated": 0}, ledger
    assert sum(per_part) == n and min(per_part) > n / P / 2, per_part  # crc32 spreads the ids
    expected = Counter(partition_of(rid, P) for rid in answered)
    assert [expected[p] for p in range(P)] == per_part, "each request went to the partition of its id"
    assert worker.alive


def test_a_retry_with_the_same_id_meets_the_same_dedupe_marker(rc: RedisCluster, worker: WorkerProc,
                                                               redis_cluster_url: str) -> None:
    rid = "retry-me-0001"
    keys: ModelKeys = partition_keys("headrace", "affine", P)[partition_of(rid, P)]
    with Client(redis_cluster_url, redis_cluster=True, partitions=P, client_id="again", timeout_s=30) as client:
        first = client.infer("affine", inputs={"x": np.ones(4, np.float32)}, request_id=rid)
        assert first.ok and first.request_id == rid
        # the same id again (a producer that did not see the first answer): enqueued on the
        # same partition, where the marker makes the worker ack it without a second answer
        again = client.submit("affine", inputs={"x": np.ones(4, np.float32)}, request_id=rid)
        wait_until(lambda: _added(rc, keys.requests) == 2 and not rc.xpending(keys.requests, "workers")["pending"]
                   and rc.xinfo_groups(keys.requests)[0]["lag"] == 0, 30)
        assert rc.exists(keys.done(rid)) == 1
        assert _added(rc, keys.reply("again")) == 1, "answered once"
        again.cancel()


async def test_the_async_client_spreads_and_collects_over_the_cluster(rc: RedisCluster, worker: WorkerProc,
                                                                      redis_cluster_url: str) -> None:
    from headrace.client import AsyncClient

    n = 200
    async with AsyncClient(redis_cluster_url, redis_cluster=True, partitions=P, client_id="aio",
                           timeout_s=60) as client:
        tickets = [await client.submit("affine", inputs={"x": np.full(4, i, np.float32)}) for i in range(n)]
        results = await client.collect(tickets)
        assert [float(r.outputs["y"][0]) for r in results] == [2.0 * i + 1 for i in range(n)]
        parts = partition_keys("headrace", "affine", P)
        assert sum(_added(rc, k.reply("aio")) for k in parts) == n, "answered once each"
        assert sum(1 for k in parts if _added(rc, k.requests)) == P, "every partition was used"


def test_a_client_with_another_partition_count_is_told_before_it_sends(worker: WorkerProc,
                                                                        redis_cluster_url: str) -> None:
    from headrace.client import errors as E

    with Client(redis_cluster_url, redis_cluster=True, partitions=3) as client, \
            pytest.raises(E.ConfigError, match=r"reading 6 partition\(s\), but this client sends to 3"):
        client.submit("affine", inputs={"x": np.ones(4, np.float32)})
    with Client(redis_cluster_url, redis_cluster=True) as client, pytest.raises(E.ConfigError, match="partitions"):
        client.infer("affine", inputs={"x": np.ones(4, np.float32)})


def test_a_killed_workers_entries_on_every_partition_are_rescued_once(redis_cluster_url: str, rc: RedisCluster,
                                                                      tmp_path: Path) -> None:
    """SIGKILL a worker mid-batch: another claims its pending entries, partition by
    partition, after the lease; every request is answered, none twice."""
    n = 240
    common = ("--partitions", str(P), "--redis-cluster", "--max-batch", "16", "--block-ms", "50", "--lease-s", "1")
    victim = WorkerProc(redis_cluster_url, tmp_path / "victim.log", *common, "--consumer", "victim",
                        env={"HEADRACE_FAKE_DELAY_MS": "300"})
    rescuer = None
    try:
        wait_until(lambda: rc.hget(registry_key("headrace"), "affine") or not victim.alive, 60)
        with Client(redis_cluster_url, redis_cluster=True, partitions=P, client_id="rescue", timeout_s=90) as client:
            tickets = [client.submit("affine", inputs={"x": np.full(4, i, np.float32)}) for i in range(n)]
            parts = partition_keys("headrace", "affine", P)
            wait_until(lambda: sum(rc.xpending(k.requests, "workers")["pending"] for k in parts) > 0, 30)
            victim.proc.kill()
            victim.wait(10)
            rescuer = WorkerProc(redis_cluster_url, tmp_path / "rescuer.log", *common, "--consumer", "rescuer")
            results = client.collect(tickets, timeout_s=90)
            assert [float(r.outputs["y"][0]) for r in results] == [2.0 * i + 1 for i in range(n)]
            assert sum(_added(rc, k.reply("rescue")) for k in parts) == n, "nothing answered twice"
            assert sum(rc.xpending(k.requests, "workers")["pending"] for k in parts) == 0
    finally:
        victim.kill()
        if rescuer is not None:
            rescuer.kill()


def test_the_cli_shows_and_loads_on_the_cluster(worker: WorkerProc, redis_cluster_url: str) -> None:
    """``headrace status`` adds up a partitioned model's streams; ``functions load`` covers
    every primary (``HEADRACE_REDIS_CLUSTER=1``)."""
    from click.testing import CliRunner

    from headrace.cluster.cli.main import main

    with Client(redis_cluster_url, redis_cluster=True, partitions=P, timeout_s=30) as client:
        list(client.map("affine", [{"x": np.ones(4, np.float32)}] * 30, chunk_size=1))  # one entry per item: the stats count entries
    env = {"COLUMNS": "200", "HEADRACE_REDIS_CLUSTER": "1"}
    res = CliRunner().invoke(main, ["--redis-url", redis_cluster_url, "status"], env=env)
    assert res.exit_code == 0, res.output
    rows = {cells[0]: cells for cells in (line.split() for line in res.output.splitlines()) if len(cells) == 10}
    assert set(rows) == {"affine"}, res.output  # one model, not one row per partition
    model, stream, lag, pending, consumers, workers, dlq, rps = rows["affine"][:8]
    assert (lag, pending, consumers, workers, dlq) == ("0", "0", "1", "1", "0"), res.output
    assert 1 <= int(stream) <= 30, "all partitions' entries (until trimmed)"
    assert float(rps) == pytest.approx(30 / 60, abs=0.05), "every partition's batches are in the stats"
    res = CliRunner().invoke(main, ["--redis-url", redis_cluster_url, "functions", "load"], env=env)
    assert res.exit_code == 0 and res.output.count("current") == 3, res.output


def test_chunked_map_spreads_multi_sample_entries_over_the_partitions(rc: RedisCluster, worker: WorkerProc,
                                                                     redis_cluster_url: str) -> None:
    """``map``'s default multi-sample entries: each chunk goes to the partition of its own id,
    every item answered once and in order."""
    n, chunk = 640, 32
    items: list[Any] = [{"x": np.full(4, i, np.float32)} for i in range(n)]
    parts = partition_keys("headrace", "affine", P)
    before = [_added(rc, k.requests) for k in parts]
    with Client(redis_cluster_url, redis_cluster=True, partitions=P, client_id="chunks", timeout_s=60) as client:
        results = list(client.map("affine", items, chunk_size=chunk))
        replies = sum(_added(rc, k.reply("chunks")) for k in parts)  # before close deletes them
    assert len(results) == n and all(r.ok for r in results)
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.outputs["y"], np.full(4, 2 * i + 1, np.float32))
    entries = [_added(rc, k.requests) - b for k, b in zip(parts, before, strict=True)]
    assert sum(entries) == n // chunk, entries
    assert sum(1 for e in entries if e) >= 3, f"the chunks' ids spread them: {entries}"
    assert replies == n // chunk, "one result per entry"
