"""A partitioned model's inbox wait (strict submit mode): it waits on every partition at once
and reuses waits a previous call left running. A reused wait can be shorter than the new
call's; its running out must not end the new call before its own ``block_ms``."""

from __future__ import annotations

import asyncio
import time

import pytest

from headrace.client import errors as E
from headrace.workers.broker.partitioned import PartitionedBroker
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore


class LateWait(MemoryBroker):
    """A partition whose inbox waits end ``late_s`` after the time asked for (a slow link):
    a wait of a previous, shorter call is then still running when the next call starts."""

    def __init__(self, store: MemoryStore, late_s: float) -> None:
        super().__init__(store, "w")
        self.late_s = late_s

    async def wait_inbox(self, block_ms: int) -> bool:
        found = await super().wait_inbox(block_ms)
        await asyncio.sleep(self.late_s)
        return found


class DownWait(MemoryBroker):
    async def wait_inbox(self, block_ms: int) -> bool:
        raise E.BrokerError("partition unreachable")


def partitioned(late_s: tuple[float, ...]) -> tuple[PartitionedBroker, list[MemoryStore]]:
    stores = [MemoryStore() for _ in late_s]
    return PartitionedBroker([LateWait(s, late) for s, late in zip(stores, late_s, strict=True)]), stores


@pytest.mark.timeout(10)
async def test_a_leftover_shorter_wait_does_not_end_a_longer_one_early() -> None:
    broker, stores = partitioned((0.0, 0.2, 0.2))
    assert await broker.wait_inbox(20) is False  # partition 0 answers; 1 and 2 run on for 0.2 s

    async def push_later() -> None:
        await asyncio.sleep(0.5)  # after the leftover waits of partitions 1 and 2 ran out
        stores[0].push(b"element")

    pusher = asyncio.ensure_future(push_later())
    t0 = time.monotonic()
    assert await broker.wait_inbox(3000) is True
    assert 0.4 < time.monotonic() - t0 < 2.0, "answered when the element came, not before"
    await pusher
    await broker.close()


@pytest.mark.timeout(10)
async def test_an_empty_wait_still_ends_at_its_own_deadline() -> None:
    broker, _ = partitioned((0.0, 0.2, 0.2))
    assert await broker.wait_inbox(20) is False
    t0 = time.monotonic()
    assert await broker.wait_inbox(400) is False
    waited = time.monotonic() - t0
    assert 0.38 < waited < 1.5, f"waited {waited:.3f} s for a 0.4 s wait"
    await broker.close()


@pytest.mark.timeout(10)
async def test_an_element_on_any_partition_ends_the_wait() -> None:
    broker, stores = partitioned((0.0, 0.0, 0.0))
    stores[2].push(b"element")
    t0 = time.monotonic()
    assert await broker.wait_inbox(3000) is True
    assert time.monotonic() - t0 < 1.0
    await broker.close()


@pytest.mark.timeout(10)
async def test_an_unreachable_partition_does_not_cut_the_wait_of_the_others(caplog: pytest.LogCaptureFixture) -> None:
    """Its master down, one partition's wait fails at once; the others wait their time
    (an error there made the relay loop back off, up to 2 s, while the healthy partitions'
    inboxes filled). The outage is logged; it is raised only when every partition failed."""
    healthy = MemoryStore()
    broker = PartitionedBroker([DownWait(MemoryStore(), "w"), MemoryBroker(healthy, "w")])
    t0 = time.monotonic()
    assert await broker.wait_inbox(200) is False
    assert time.monotonic() - t0 >= 0.18, "the healthy partition waited its block_ms"
    assert "partition unreachable" in caplog.text

    async def push_later() -> None:
        await asyncio.sleep(0.2)
        healthy.push(b"element")

    pusher = asyncio.ensure_future(push_later())
    assert await broker.wait_inbox(3000) is True, "an element on the healthy partition still wakes it"
    await pusher
    await broker.close()


@pytest.mark.timeout(10)
async def test_every_partition_unreachable_is_raised() -> None:
    broker = PartitionedBroker([DownWait(MemoryStore(), "w"), DownWait(MemoryStore(), "w")])
    with pytest.raises(E.BrokerError, match="unreachable"):
        await broker.wait_inbox(200)
    await broker.close()
