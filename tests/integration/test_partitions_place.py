"""``headrace partitions show|place`` on a real 3-master Redis Cluster of its own: a
partitioned model's empty slots spread evenly over the masters, every master agreeing;
slots holding keys and a non-cluster Redis refused with a clear error, nothing changed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result
from redis.cluster import RedisCluster, key_slot

from headrace.client.keys import partition_keys
from headrace.cluster.cli.main import main
from tests.support.redis_cluster import RedisClusterProcs

pytestmark = pytest.mark.timeout(120)

P = 6  # {affine~0..5} hash 1 / 1 / 4 over three equal slot ranges


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcs]:
    with RedisClusterProcs(3, node_timeout_ms=1000) as c:
        yield c


def _cli(url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--redis-url", url, "partitions", *args], env={"COLUMNS": "200"})


def _slots(model: str) -> list[int]:
    return [key_slot(k.requests.encode()) for k in partition_keys("headrace", model, P)]


def _views(cluster: RedisClusterProcs, slots: list[int]) -> list[dict[int, str]]:
    return [cluster.slot_owners(i, slots) for i in range(cluster.masters)]


def _open_slot_states(cluster: RedisClusterProcs) -> list[object]:
    """The importing or migrating slots each node lists (``CLUSTER NODES``' ``[slot-<-id]``)."""
    import redis

    out: list[object] = []
    for n in cluster.nodes:
        r = redis.Redis.from_url(n.url)
        try:
            out += [info["migrations"] for info in r.cluster("nodes").values() if info.get("migrations")]
        finally:
            r.close()
    return out


def _crowded_model() -> str:
    """A model name whose partitions, unplaced, crowd (some master holds 4 or more)."""
    from tests.support.redis_cluster import slot_ranges

    ranges = slot_ranges(3)
    for n in range(1000):
        homes = [next(i for i, (lo, hi) in enumerate(ranges) if lo <= s <= hi) for s in _slots(f"m{n}")]
        if max(Counter(homes).values()) >= 4:
            return f"m{n}"
    raise AssertionError("no crowded model name among 1000")


def test_place_spreads_the_partitions_evenly_and_every_master_agrees(cluster: RedisClusterProcs) -> None:
    cluster.flush()
    slots = _slots("affine")
    before = _views(cluster, slots)
    assert sorted(Counter(before[0].values()).values()) == [1, 1, 4], "unplaced, they crowd on one master"

    shown = _cli(cluster.url, "show", "affine", "--partitions", str(P))
    assert shown.exit_code == 0, shown.output
    assert "moves" in shown.output and "after place: 2 / 2 / 2" in shown.output, shown.output
    assert _views(cluster, slots) == before, "show changes nothing"

    placed = _cli(cluster.url, "place", "affine", "--partitions", str(P))
    assert placed.exit_code == 0, placed.output
    assert "moved" in placed.output and "now: 2 / 2 / 2" in placed.output, placed.output
    after = _views(cluster, slots)
    assert after[0] == after[1] == after[2], after
    assert sorted(Counter(after[0].values()).values()) == [2, 2, 2]
    assert _open_slot_states(cluster) == []

    again = _cli(cluster.url, "place", "affine", "--partitions", str(P))
    assert again.exit_code == 0 and "moved" not in again.output and again.output.count("stays") == P, again.output

    rc = RedisCluster.from_url(cluster.url)
    try:  # every partition's stream is writable where the masters now say it is
        for k in partition_keys("headrace", "affine", P):
            assert rc.xadd(k.requests, {b"n": b"1"}) and rc.xlen(k.requests) == 1
    finally:
        rc.close()


def test_a_slot_holding_keys_is_refused_before_anything_moves(cluster: RedisClusterProcs) -> None:
    cluster.flush()
    model = _crowded_model()
    slots = _slots(model)
    show = _cli(cluster.url, "show", model, "--partitions", str(P))
    assert show.exit_code == 0, show.output
    rows = [[c.strip() for c in line.split("│")] for line in show.output.splitlines() if line.count("│") == 6]
    moving = [int(cells[1]) for cells in rows if cells[5] == "moves"]
    assert len(moving) >= 2, show.output  # the keys go into the last one: the first moves must not happen
    rc = RedisCluster.from_url(cluster.url)
    try:
        rc.xadd(partition_keys("headrace", model, P)[moving[-1]].requests, {b"n": b"1"})
    finally:
        rc.close()
    before = _views(cluster, slots)

    res = _cli(cluster.url, "place", model, "--partitions", str(P))
    assert res.exit_code == 1, res.output
    assert f"partition {moving[-1]} holds keys" in res.output and "redis-cli --cluster reshard" in res.output
    assert _views(cluster, slots) == before, "nothing moved, the earlier partitions included"
    assert _open_slot_states(cluster) == []


def test_a_redis_that_is_not_a_cluster_is_refused_clearly(redis_url: str) -> None:
    res = _cli(redis_url, "place", "affine", "--partitions", "3")
    assert res.exit_code == 1
    assert "no Redis Cluster reached" in res.output and "cluster mode" in res.output.lower(), res.output
    secret = redis_url.replace("redis://", "redis://admin:s3cret-pw@", 1)
    res = _cli(secret, "show", "affine", "--partitions", "3")
    assert res.exit_code == 1 and "Error:" in res.output, res.output
    assert "s3cret-pw" not in res.output, "the password stays out of the message"
