"""Partition keys and settings: one partition keeps every key as it was; more get one hash
tag (slot) each; the partition of a request id is stable; bad counts fail with a fix-it."""

from __future__ import annotations

import pytest
from redis.cluster import key_slot

from headrace.client import errors as E
from headrace.client.config import ClientSettings
from headrace.client.core import ClientCore
from headrace.client.keys import ModelKeys, partition_keys, partition_of
from headrace.client.sharding import by_slot
from headrace.workers.settings import WorkerSettings


def test_one_partition_keeps_the_unpartitioned_keys() -> None:
    (only,) = partition_keys("hr", "minilm", 1)
    assert only == ModelKeys("hr", "minilm")
    assert only.requests == "hr:{minilm}:requests" and only.reply("c") == "hr:{minilm}:reply:c"


def test_each_partition_is_its_own_slot_and_keeps_its_keys_together() -> None:
    parts = partition_keys("hr", "minilm", 4)
    assert [k.requests for k in parts] == [f"hr:{{minilm~{p}}}:requests" for p in range(4)]
    assert all(k.model == "minilm" for k in parts), "a partition serves the model itself"
    for k in parts:
        assert len({key_slot(x.encode()) for x in (k.requests, k.dlq, k.limits, k.done("r"), k.reply("c"),
                                                    k.cancel("r"), k.stats)}) == 1
    assert len({key_slot(k.requests.encode()) for k in parts}) == 4


def test_the_partition_of_an_id_is_crc32_and_stable() -> None:
    import zlib

    assert partition_of("abc", 1) == 0
    assert partition_of("abc", 7) == zlib.crc32(b"abc") % 7
    spread = [partition_of(f"r{i}", 3) for i in range(3000)]
    assert all(800 < spread.count(p) < 1200 for p in range(3))


@pytest.mark.parametrize("bad", [0, -1, 1025])
def test_bad_partition_counts_fail_with_a_fix_it(bad: int) -> None:
    with pytest.raises(E.ConfigError, match="partitions"):
        WorkerSettings(partitions=bad)
    with pytest.raises(E.ConfigError, match="partitions"):
        ClientSettings(partitions=bad)
    with pytest.raises(E.ConfigError, match="partitions"):
        partition_keys("hr", "m", bad)


def test_settings_default_to_one_partition_and_read_the_environment() -> None:
    assert WorkerSettings().partitions == 1 and ClientSettings().partitions == 1
    s = WorkerSettings.from_env({"HEADRACE_PARTITIONS": "6", "HEADRACE_REDIS_CLUSTER": "true"})
    assert (s.partitions, s.redis_cluster) == (6, True)
    c = ClientSettings.from_env({"HEADRACE_PARTITIONS": "6", "HEADRACE_REDIS_CLUSTER": "1"})
    assert (c.partitions, c.redis_cluster) == (6, True)


def test_the_sdk_sends_each_request_to_its_partition_and_replies_come_back_there() -> None:
    core = ClientCore(ClientSettings(partitions=3), "cid")
    for rid in ("a", "b", "c", "d"):
        t = core.new_ticket("affine", None, "text", rid, None)
        p = partition_of(rid, 3)
        assert t.prepared.stream == f"headrace:{{affine~{p}}}:requests"
        assert t.prepared.reply_to == f"headrace:{{affine~{p}}}:reply:cid"
        assert core.cancel_command(t)[1] == f"headrace:{{affine~{p}}}:cancel:{rid}"
    one = ClientCore(ClientSettings(), "cid").new_ticket("affine", None, "text", "a", None)
    assert one.prepared.stream == "headrace:{affine}:requests"
    with pytest.raises(E.ProtocolError):
        core.new_ticket("affine", None, "text", "bad id with spaces", None)


def test_by_slot_groups_keys_a_cluster_accepts_together() -> None:
    parts = partition_keys("hr", "m", 3)
    streams = {k.reply("c"): "0-0" for k in parts} | {parts[0].reply("d"): "0-0"}
    groups = by_slot(streams)
    assert len(groups) == 3 and sorted(len(g) for g in groups) == [1, 1, 2]


def test_cluster_routing_reads_fcall_and_xread_keys_off_the_command() -> None:
    from headrace.client.sharding import _local_keys

    assert _local_keys(("FCALL", "headrace_submit", 2, "a{m}", "b{m}", "workers", 0)) == ["a{m}", "b{m}"]
    assert _local_keys(("XREAD", "COUNT", 5, "BLOCK", 1, "STREAMS", "s1", "s2", "0-0", "0-0")) == ["s1", "s2"]
    assert _local_keys(("XREADGROUP", "GROUP", "g", "c", b"STREAMS", "s", ">")) == ["s"]
    assert _local_keys(("FCALL", "f", 0)) is None and _local_keys(("GET", "k")) is None


class _FakeCluster:
    """Records the reads a SlotReader makes; ``data`` answers the non-blocking ones."""

    def __init__(self) -> None:
        self.blocking: list[tuple[list[str], int]] = []
        self.data: list[list[object]] = []

    def pipeline(self, transaction: bool = False) -> _FakeCluster:
        self.batch: list[list[str]] = []
        return self

    def xread(self, streams: dict[str, str], count: int, block: int | None = None) -> object:
        if block is None:
            self.batch.append(list(streams))
            return None
        self.blocking.append((list(streams), block))
        return []

    def execute(self) -> list[object]:
        return self.data.pop(0) if self.data else [None] * len(self.batch)


def test_the_cluster_reply_reader_reads_every_slot_then_waits_on_one_in_short_growing_slices() -> None:
    from headrace.client.slot_reader import SlotReader

    streams = {k.reply("c"): "0-0" for k in partition_keys("hr", "m", 3)}
    fake, reader = _FakeCluster(), SlotReader(max_slice_ms=8)
    for _ in range(6):
        assert reader.read(fake, streams, 10, 1000) == []
    assert [w for _, w in fake.blocking] == [1, 2, 4, 8, 8, 8], "the slice doubles while idle, capped"
    assert {s[0] for s, _ in fake.blocking} == set(streams), "every slot gets its turn to block"
    assert all(len(s) == 1 for s, _ in fake.blocking) and len(fake.batch) == 3
    fake.data = [[None, [["s", [("1-0", {})]]], None]]
    assert reader.read(fake, streams, 10, 1000) == [["s", [("1-0", {})]]]
    reader.read(fake, streams, 10, 1000)
    assert fake.blocking[-1][1] == 1, "a read that found something resets the slice"
