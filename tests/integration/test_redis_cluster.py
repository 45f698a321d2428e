"""The loopback Redis Cluster harness (tests/support/redis_cluster.py) and the per-shard
CPU accounting built on it (benchmarks/lib/shard_cpu.py)."""

from __future__ import annotations

import itertools
import time

import pytest
import redis
from redis.cluster import RedisCluster, key_slot

from benchmarks.lib.shard_cpu import ShardCpu, implied_ceiling
from headrace.client.keys import ModelKeys, partition_keys
from tests.support.redis_cluster import SLOTS, RedisClusterProcs, slot_ranges

pytestmark = pytest.mark.timeout(120)


def test_slot_ranges_cover_every_slot_once() -> None:
    for n in (1, 2, 3, 7):
        ranges = slot_ranges(n)
        covered = [s for lo, hi in ranges for s in range(lo, hi + 1)]
        assert covered == list(range(SLOTS))
    with pytest.raises(ValueError):
        slot_ranges(0)


def test_three_masters_serve_streams_on_every_shard(redis_cluster: RedisClusterProcs,
                                                    redis_cluster_url: str) -> None:
    rc = RedisCluster.from_url(redis_cluster_url)
    try:
        masters = {(n.host, n.port) for n in rc.get_primaries()}
        assert len(masters) == 3
        # one stream per shard: find a hash tag for each master
        tags: dict[tuple[str, int], str] = {}
        i = 0
        while len(tags) < 3:
            node = rc.get_node_from_key(f"{{p{i}}}")
            tags.setdefault((node.host, node.port), f"p{i}")
            i += 1
        for tag in tags.values():
            stream = f"t:{{{tag}}}:requests"
            rc.xgroup_create(stream, "g", id="0", mkstream=True)
            rc.xadd(stream, {b"n": tag.encode()})
            got = rc.xreadgroup("g", "c", {stream: ">"}, count=10)
            entries = got[0][1] if isinstance(got, list) else next(iter(got.values()))[0]
            assert [e[1][b"n"] for e in entries] == [tag.encode()]
            assert rc.xack(stream, "g", entries[0][0]) == 1
        # keys of different shards cannot meet in one command: a real cluster refuses
        a, b = (f"t:{{{t}}}:requests" for t in list(tags.values())[:2])
        with pytest.raises(redis.RedisError, match="CROSSSLOT|slot"):
            rc.execute_command("XREAD", "STREAMS", a, b, "0", "0", target_nodes=rc.get_node_from_key(a))
        # every key of one headrace model shares the model's slot
        keys = ModelKeys("hr", "minilm")
        slots = {rc.keyslot(k) for k in (keys.requests, keys.dlq, keys.stats, keys.done("r1"), keys.reply("c1"))}
        assert len(slots) == 1
    finally:
        rc.close()


def test_shard_cpu_rises_where_the_load_goes(redis_cluster: RedisClusterProcs, redis_cluster_url: str) -> None:
    rc = RedisCluster.from_url(redis_cluster_url)
    try:
        key = "load:{x}:s"
        busy = rc.get_node_from_key(key)
        busy_url = next(u for u in redis_cluster.urls if u.endswith(f":{busy.port}/0"))
        meter = ShardCpu(redis_cluster.urls)
        meter.idle(0.5)
        meter.start()
        pipe = rc.pipeline()
        for i in range(20_000):
            pipe.xadd(key, {b"i": str(i).encode(), b"pad": b"x" * 100})
        pipe.execute()
        per = meter.stop().per_request_us(20_000)
    finally:
        rc.close()
    assert set(per) == set(redis_cluster.urls)
    others = [v for u, v in per.items() if u != busy_url]
    assert per[busy_url] > 0.2  # an XADD costs the shard that holds the key some CPU
    assert per[busy_url] > 3 * max(others)
    assert implied_ceiling(per) == pytest.approx(1e6 / per[busy_url])


def test_teardown_stops_every_node() -> None:
    cluster = RedisClusterProcs(3).start()
    urls = cluster.urls
    assert all(redis.Redis.from_url(u).ping() for u in urls)
    cluster.stop()
    for u in urls:
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(u, socket_connect_timeout=0.5).ping()
    cluster.stop()  # idempotent


def _keys_moved_round_the_masters() -> list[str]:
    """Partition keys whose slots start on masters 1, 2, 0: placing them on 0, 1, 2 moves
    every slot, round a cycle, so at least one move goes from a greater config epoch to a
    smaller one, the move the race crosses."""
    ranges = slot_ranges(3)
    for n in itertools.count():
        keys = [k.requests for k in partition_keys("hr", f"m{n}", 3)]
        homes = [next(i for i, (lo, hi) in enumerate(ranges) if lo <= key_slot(k.encode()) <= hi) for k in keys]
        if homes == [1, 2, 0]:
            return keys
    raise AssertionError("unreachable")


def test_placed_slots_stay_with_their_new_owners_however_slow_the_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving a slot by a bare SETSLOT NODE on each node in turn let the old owner's gossip,
    sent while the others were being told, cross the nodes' maps for good (seen in CI: a
    partitioned worker never got its consumer group made). A pause after every SETSLOT,
    wider than a gossip round, opens that window every time; place must still leave every
    node agreeing and every partition writable."""
    real = redis.Redis.execute_command

    def slow(self: redis.Redis, *args: object, **kwargs: object) -> object:
        out = real(self, *args, **kwargs)
        if args and args[0] == "CLUSTER SETSLOT":
            time.sleep(0.3)
        return out

    with RedisClusterProcs(3, node_timeout_ms=1000) as cluster:
        keys = _keys_moved_round_the_masters()
        monkeypatch.setattr(redis.Redis, "execute_command", slow)
        owners = cluster.place(keys, timeout_s=10)
        monkeypatch.undo()
        time.sleep(1.0)  # a few gossip rounds: a crossed map would show by now
        ids = [cluster.slot_owners(i, [key_slot(k.encode()) for k in keys]) for i in range(3)]
        assert ids[0] == ids[1] == ids[2], ids
        assert sorted(owners) == [0, 1, 2]
        assert len(set(ids[0].values())) == 3, "one partition per master"
        rc = RedisCluster.from_url(cluster.url)
        try:
            for key in keys:
                assert rc.xadd(key, {b"n": b"1"})
                assert rc.xlen(key) == 1
        finally:
            rc.close()
