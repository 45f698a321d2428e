"""One partition of a partitioned model fails (its Redis Cluster master is down) while the
others serve: what they delivered in the same read or claim is handed to the worker, not
dropped. Dropped, those entries stayed pending on the worker, came back after the lease and
were dropped again, until the worker dead-lettered them as poison (seen with a real cluster
and ``cluster-require-full-coverage no``; the chaos tier has that run)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request, encode_request
from headrace.workers.broker.partitioned import PartitionedBroker
from headrace.workers.testing.clock import ManualClock
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore

pytestmark = pytest.mark.timeout(10)


def _request(rid: str) -> dict[bytes, bytes]:
    return encode_request(Request(Envelope(rid, "c1"), inputs={"x": np.ones(4, np.float32)}))


async def _broker(clock: ManualClock) -> tuple[PartitionedBroker, list[MemoryStore]]:
    stores = [MemoryStore(clock=clock) for _ in range(3)]
    broker = PartitionedBroker([MemoryBroker(s, "w") for s in stores])
    await broker.ensure_group()
    return broker, stores


@pytest.mark.parametrize("down", [0, 1, 2])
async def test_reads_hand_over_what_the_healthy_partitions_delivered(down: int) -> None:
    broker, stores = await _broker(ManualClock())
    for p, store in enumerate(stores):
        store.add(_request(f"r{p}"))
    stores[down].fail_ops = 10**6
    got = [e.entry_id for e in await broker.read_ready(10)]  # one read visits every partition
    healthy = [p for p in range(3) if p != down]
    assert sorted(e.split("/")[0] for e in got) == [str(p) for p in healthy]
    for p in healthy:
        assert [x.deliveries for x in stores[p].pel.values()] == [1], "delivered once, to the worker"
    assert await broker.read_ready(10) == [], "nothing left: an empty read, the healthy partitions still read"
    await broker.close()


async def test_claims_hand_over_what_the_healthy_partitions_reclaimed() -> None:
    clock = ManualClock()
    broker, stores = await _broker(clock)
    for p, store in enumerate(stores):
        store.add(_request(f"r{p}"))
    dead = PartitionedBroker([MemoryBroker(s, "dead") for s in stores])
    assert len(await dead.read_ready(10)) == 3  # another worker took all three and died
    clock.advance(60)
    stores[1].fail_ops = 10**6
    claimed = [e.entry_id.split("/")[0] for e in await broker.claim_abandoned(1000, 10)]
    assert sorted(claimed) == ["0", "2"]
    assert [x.consumer for x in stores[0].pel.values()] == ["w"] == [x.consumer for x in stores[2].pel.values()]


async def test_with_every_partition_down_the_read_fails_as_before() -> None:
    broker, stores = await _broker(ManualClock())
    for store in stores:
        store.fail_ops = 10**6
    with pytest.raises(E.BrokerError):
        await broker.read_ready(10)


async def test_a_blocking_read_keeps_waiting_on_the_healthy_partitions() -> None:
    """Before, the failed partition's wait ended the whole wait at once with its error, and
    the worker's read loop then backed off (up to 2 s) while entries came in elsewhere."""
    stores = [MemoryStore() for _ in range(3)]
    broker = PartitionedBroker([MemoryBroker(s, "w") for s in stores])
    await broker.ensure_group()
    stores[1].fail_ops = 10**6

    async def add_later() -> None:
        await asyncio.sleep(0.3)
        stores[2].add(_request("late"))

    adder = asyncio.ensure_future(add_later())
    t0 = time.monotonic()
    got = await broker.read(10, 3000)
    assert [e.entry_id.split("/")[0] for e in got] == ["2"]
    assert 0.25 < time.monotonic() - t0 < 2.0, "taken when it came"
    await adder
    t0 = time.monotonic()
    assert await broker.read(10, 300) == [], "nothing came: an empty read, not the one partition's error"
    assert time.monotonic() - t0 >= 0.25, "it waited its block_ms on the healthy partitions"
    await broker.close()


async def test_a_failed_partition_is_asked_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """Left out of the sequential rounds after it failed, a partition must come back by
    itself even when the others keep the worker busy (no blocking read to probe it)."""
    import headrace.workers.broker.partition_health as health

    monkeypatch.setattr(health, "DOWN_RETRY_S", 0.2)
    broker, stores = await _broker(ManualClock())
    stores[1].fail_ops = 10**6
    stores[0].add(_request("a"))
    assert [e.entry_id[0] for e in await broker.read_ready(10)] == ["0"]
    stores[1].fail_ops = 0  # the master is back
    stores[1].add(_request("b"))
    stores[0].add(_request("c"))
    assert [e.entry_id[0] for e in await broker.read_ready(10)] == ["0"], "still left out"
    await asyncio.sleep(0.25)
    stores[0].add(_request("d"))
    assert sorted(e.entry_id[0] for e in await broker.read_ready(10)) == ["0", "1"], "asked again"
    await broker.close()


async def test_the_relay_moves_the_healthy_inboxes_and_fails_only_when_all_fail() -> None:
    """Strict mode's relay step with one partition down: the others' inbox elements still
    move (before, its error made the relay loop back off while they waited)."""
    broker, stores = await _broker(ManualClock())
    for store in stores:
        store.push(b"element")
    stores[0].fail_ops = 10**6
    step = await broker.relay(10)
    assert step.moved == 2 and step.left == 0
    assert [len(s.inbox) for s in stores] == [1, 0, 0]
    for store in stores:
        store.fail_ops = 10**6
    with pytest.raises(E.BrokerError):
        await broker.relay(10)
    await broker.close()


async def test_a_worker_starts_with_a_partition_down_and_serves_the_others() -> None:
    """Creating the groups with one master down leaves that partition out instead of failing
    the whole start (before, the worker waited for every partition and served none)."""
    stores = [MemoryStore(clock=ManualClock()) for _ in range(3)]
    stores[1].fail_ops = 10**6
    broker = PartitionedBroker([MemoryBroker(s, "w") for s in stores])
    await broker.ensure_group()
    assert [s.group_exists for s in stores] == [True, False, True]
    stores[2].add(_request("a"))
    assert [e.entry_id[0] for e in await broker.read_ready(10)] == ["2"]
    await broker.close()


async def test_a_start_with_every_partition_down_fails_as_before() -> None:
    stores = [MemoryStore(clock=ManualClock()) for _ in range(2)]
    for store in stores:
        store.fail_ops = 10**6
    broker = PartitionedBroker([MemoryBroker(s, "w") for s in stores])
    with pytest.raises(E.BrokerError, match="outage"):
        await broker.ensure_group()
    await broker.close()


async def test_a_failed_inbox_wait_leaves_its_partition_out_of_the_next_relay_step() -> None:
    """The inbox wait tells the shared health what failed, as reads do: the relay step right
    after it does not spend a call (seconds of redis-py's retries on a real cluster) on it."""
    broker, stores = await _broker(ManualClock())
    stores[0].fail_ops = 10**6
    assert await broker.wait_inbox(50) is False
    asked = stores[0].fail_ops
    stores[1].push(b"element")
    assert (await broker.relay(10)).moved == 1
    assert stores[0].fail_ops == asked, "the failed partition was asked again at once"
    await broker.close()
