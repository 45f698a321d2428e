"""The relay task on the in-memory broker: two workers relay the inbox and answer every
request once, refused elements are dead-lettered and counted, an outage backs off and
resumes, and a relay task that dies fails the worker (supervision)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from headrace.client import errors as E
from headrace.workers.backends.fake import AffineServable
from headrace.workers.broker.inbox import RelayStep
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from tests.support.memory_worker import affine_fields, by_id, running, settings, wait_for


def packed(fields: dict[bytes, bytes]) -> bytes:
    return msgpack.packb([x for kv in fields.items() for x in kv], use_bin_type=False)


@pytest.mark.timeout(20)
async def test_two_workers_relay_the_inbox_and_answer_each_request_once() -> None:
    store = MemoryStore()
    w1 = StreamWorker(settings(relay_batch=3), AffineServable(), MemoryBroker(store, "w1"))
    w2 = StreamWorker(settings(relay_batch=5), AffineServable(), MemoryBroker(store, "w2"))
    async with running(w1, w2):
        for i in range(200):
            store.push(packed(affine_fields(f"r{i}", float(i))))
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        await wait_for(lambda: len(by_id(store)) == 200)
    got = by_id(store)
    assert all(len(v) == 1 and v[0].ok for v in got.values())
    assert store.inbox == [] and w1.stats().get("relayed", 0) + w2.stats().get("relayed", 0) == 200


@pytest.mark.timeout(20)
async def test_refused_inbox_elements_are_dead_lettered_and_counted_and_serving_goes_on() -> None:
    store = MemoryStore()
    w = StreamWorker(settings(), AffineServable(), MemoryBroker(store, "w1"))
    async with running(w):
        store.push(b"\xc1 not msgpack")
        store.push(msgpack.packb({"v": "1"}))
        store.push(packed(affine_fields("after")))
        await wait_for(lambda: "after" in by_id(store))
    assert [f[b"dlq_code"] for _, f in store.dlq] == [b"decode_error", b"decode_error"]
    assert w.stats()["relay_dead_lettered"] == 2 and w.failed is None


class FlakyRelay(MemoryBroker):
    """Relay calls fail while ``down`` (an outage of that one call)."""

    down = 3

    async def relay(self, count: int) -> RelayStep:
        if self.down > 0:
            self.down -= 1
            raise E.BrokerError("relay: Redis unreachable (simulated)")
        return await super().relay(count)


@pytest.mark.timeout(20)
async def test_a_relay_outage_backs_off_and_resumes() -> None:
    store = MemoryStore()
    store.push(packed(affine_fields("late")))
    w = StreamWorker(settings(), AffineServable(), FlakyRelay(store, "w1"))
    async with running(w):
        await wait_for(lambda: "late" in by_id(store), 10)
        assert w.failed is None


class BrokenRelay(MemoryBroker):
    async def relay(self, count: int) -> Any:
        raise RuntimeError("a bug in the relay")


@pytest.mark.timeout(20)
async def test_a_relay_task_that_dies_fails_the_worker() -> None:
    w = StreamWorker(settings(), AffineServable(), BrokenRelay(MemoryStore(), "w1"))
    task = asyncio.ensure_future(w.run())
    await asyncio.wait_for(task, 10)
    assert w.failed is not None and "'relay'" in str(w.failed) and not w.healthy()
