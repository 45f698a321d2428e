"""The worker loop on the in-memory broker, over its life: lease refresh, stop with and
without drain, broker outages, reconfigure, the worker thread, stuck model calls, and
instances running batches side by side."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from headrace.client import errors as E
from headrace.workers.backends.fake import AffineServable, affine_reference
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from tests.support.memory_worker import REPLY, affine_fields, by_id, running, settings, wait_for


@pytest.mark.timeout(20)
async def test_long_batch_keeps_its_lease_and_is_not_run_twice() -> None:
    store = MemoryStore()
    slow, other = AffineServable(delay_ms=600), AffineServable()
    s = settings(lease_s=0.15, max_batch=4)
    w_slow = StreamWorker(s, slow, MemoryBroker(store, "slow"))
    async with running(w_slow):
        for i in range(4):
            store.add(affine_fields(f"r{i}"))
        await wait_for(lambda: len(slow.batches) == 1)
        w_other = StreamWorker(s, other, MemoryBroker(store, "other"))
        async with running(w_other):  # claims every lease_s/2 while the slow batch runs 4x the lease
            await wait_for(lambda: len(store.results(REPLY)) == 4)
    assert slow.invocations == {f"r{i}": 1 for i in range(4)}
    assert not other.invocations
    assert len(store.results(REPLY)) == 4


@pytest.mark.timeout(20)
async def test_stop_without_drain_leaves_entries_pending_for_another_worker() -> None:
    store = MemoryStore()
    s = settings(lease_s=0.1)
    first = StreamWorker(s, AffineServable(delay_ms=300), MemoryBroker(store, "first"))
    task = asyncio.ensure_future(first.run())
    for i in range(3):
        store.add(affine_fields(f"r{i}"))
    await wait_for(lambda: len(store.pending_ids("first")) == 3)
    await first.stop(drain=False)  # like a crash: nothing committed
    await task
    assert len(store.pending_ids("first")) == 3 and not store.results(REPLY)
    rescuer_sv = AffineServable()
    rescuer = StreamWorker(s, rescuer_sv, MemoryBroker(store, "rescuer"))
    async with running(rescuer):
        await wait_for(lambda: len(store.results(REPLY)) == 3)
    assert sorted(by_id(store)) == ["r0", "r1", "r2"] and store.pending_ids() == []
    assert all(e == 1 for e in rescuer_sv.invocations.values())


@pytest.mark.timeout(20)
async def test_graceful_stop_finishes_in_flight_work() -> None:
    store = MemoryStore()
    sv = AffineServable(delay_ms=150)
    w = StreamWorker(settings(max_batch=4), sv, MemoryBroker(store, "w1"))
    task = asyncio.ensure_future(w.run())
    for i in range(6):
        store.add(affine_fields(f"r{i}"))
    await wait_for(lambda: len(sv.batches) >= 1)  # mid-batch
    await w.stop(drain=True)
    await task
    assert len(store.results(REPLY)) == 6 and store.pending_ids() == []
    assert "w1" not in store.consumers  # left the group: it owned nothing


@pytest.mark.timeout(20)
async def test_entries_returned_by_a_read_in_progress_at_stop_are_still_run() -> None:
    store = MemoryStore()
    w = StreamWorker(settings(block_ms=400), AffineServable(), MemoryBroker(store, "w1"))
    task = asyncio.ensure_future(w.run())
    await wait_for(lambda: "w1" in store.consumers)  # the reader is inside its blocking read
    stopping = asyncio.ensure_future(w.stop(drain=True))
    await asyncio.sleep(0.01)
    store.add(affine_fields("late-arrival"))  # delivered by that read, after stop() began
    await stopping
    await task
    assert [r.request_id for r in store.results(REPLY)] == ["late-arrival"]
    assert store.pending_ids() == []


@pytest.mark.timeout(20)
async def test_drain_gives_up_after_drain_timeout_when_results_cannot_be_written() -> None:
    store = MemoryStore()
    w = StreamWorker(settings(drain_timeout_s=0.3), AffineServable(delay_ms=100), MemoryBroker(store, "w1"))
    task = asyncio.ensure_future(w.run())
    store.add(affine_fields("r0"))
    await wait_for(lambda: bool(store.pending_ids("w1")))
    store.fail_ops = 10**9  # Redis gone for good: the commit can never succeed
    t0 = time.monotonic()
    await w.stop(drain=True)
    await task
    assert time.monotonic() - t0 < 3.0
    store.fail_ops = 0
    assert store.pending_ids() == [store.pending_ids("w1")[0]]  # still pending: redelivered later
    assert not store.results(REPLY)


@pytest.mark.timeout(20)
async def test_broker_outage_is_ridden_out_and_reported_unhealthy() -> None:
    store = MemoryStore()
    w = StreamWorker(settings(), AffineServable(), MemoryBroker(store, "w1"))
    async with running(w):
        await wait_for(w.healthy)
        store.fail_ops = 12
        store.add(affine_fields("during"))
        await wait_for(lambda: not w.healthy())
        await wait_for(lambda: len(store.results(REPLY)) == 1, timeout_s=10)
        await wait_for(w.healthy)
    assert store.results(REPLY)[0].ok and store.fail_ops == 0


async def test_reconfigure_validates_and_applies() -> None:
    w = StreamWorker(settings(), AffineServable(), MemoryBroker(MemoryStore(), "w1"))
    w.reconfigure(max_batch=2, preferred_batch=1, max_wait_ms=0)
    assert (w.stats()["max_batch"], w.stats()["preferred_batch"]) == (2, 1)
    with pytest.raises(E.ConfigError):
        w.reconfigure(max_batch=0)
    with pytest.raises(E.ConfigError, match="cannot reconfigure"):
        w.reconfigure(lease_s=5)


@pytest.mark.timeout(20)
def test_worker_thread_serves_and_stops() -> None:
    store = MemoryStore()
    wt = WorkerThread(settings(), AffineServable(), broker=MemoryBroker(store, "t1")).start(timeout_s=5)
    try:
        store.add(affine_fields("r0", 2.0))
        give_up = time.monotonic() + 5
        while not store.results(REPLY) and time.monotonic() < give_up:
            time.sleep(0.01)
        assert wt.healthy()
        wt.reconfigure(max_batch=3)
        assert wt.stats()["max_batch"] == 3
    finally:
        wt.stop(timeout_s=5)
    assert not wt.alive and not wt.healthy()
    np.testing.assert_array_equal(store.results(REPLY)[0].outputs["y"], affine_reference(np.full(4, 2.0)))


@pytest.mark.timeout(20)
async def test_redelivered_requests_run_alone_and_a_stuck_call_hands_back_the_rest() -> None:
    """Entries a dead worker left behind are suspects: each runs on its own. A model call
    past infer_timeout_s stops the worker; the entries it never ran are handed back with
    their delivery count undone; the stuck one ran alone, so it is the culprit: dead-lettered
    model_error by this worker, not left to hang the next."""
    store = MemoryStore()
    dead = MemoryBroker(store, "dead")
    await dead.ensure_group()
    ids = [store.add(affine_fields("hang", 13.0))] + [store.add(affine_fields(f"r{i}", float(i))) for i in range(3)]
    assert len(await dead.read(10, 0)) == 4
    for i in ids:
        store.pel[i].delivered_at_s -= 10  # abandoned long ago
    sv = AffineServable(hang=13.0)
    w = StreamWorker(settings(lease_s=0.2, infer_timeout_s=0.2), sv, MemoryBroker(store, "w1"))
    try:
        await asyncio.wait_for(w.run(), 10)  # ends by itself: the stuck call stops it
        assert w.stuck is not None and w.stats()["infer_timeouts"] == 1
        assert sv.batches == [["hang"]]  # alone: no batch-mate was in the stuck call
        assert {store.pel[i].deliveries for i in ids[1:]} == {1}  # handed back: 2 - 1
        assert ids[0] not in store.pel and [e for e, _ in store.dlq] == [ids[0]]
        (hung,) = by_id(store)["hang"]
        assert hung.code == "model_error" and "not retried" in (hung.message or "")
    finally:
        sv.unhang()
    rescuer_sv = AffineServable()
    async with running(StreamWorker(settings(lease_s=0.2), rescuer_sv, MemoryBroker(store, "rescuer"))):
        await wait_for(lambda: len(store.results(REPLY)) == 4)
    assert rescuer_sv.batches and all(len(b) == 1 for b in rescuer_sv.batches)
    assert sorted(b[0] for b in rescuer_sv.batches) == ["r0", "r1", "r2"]
    assert sorted(by_id(store)) == ["hang", "r0", "r1", "r2"] and store.pending_ids() == []


class _Overlap(AffineServable):
    """Counts how many model calls run at the same time."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        import threading

        self._gate = threading.Lock()
        self.now = self.most = 0

    def infer(self, requests: Any) -> Any:
        with self._gate:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            return super().infer(requests)
        finally:
            with self._gate:
                self.now -= 1


@pytest.mark.timeout(20)
async def test_instances_run_batches_side_by_side_and_answer_each_once() -> None:
    store = MemoryStore()
    sv = _Overlap(delay_ms=150)
    w = StreamWorker(settings(max_batch=4, instances=2), sv, MemoryBroker(store, "w1"))
    for i in range(16):
        store.add(affine_fields(f"r{i}", float(i)))
    async with running(w):
        await wait_for(lambda: len(store.results(REPLY)) == 16)
    assert sv.most == 2  # two batches in the model at once, never more
    assert sv.invocations == {f"r{i}": 1 for i in range(16)}
    got = by_id(store)
    assert all(len(v) == 1 for v in got.values()) and len(got) == 16
    np.testing.assert_array_equal(got["r3"][0].outputs["y"], affine_reference(np.full(4, 3.0, np.float32)))
    assert w.stats()["instances"] == 2 and store.pending_ids() == []


def test_instances_need_a_thread_safe_servable() -> None:
    class Unsafe(AffineServable):
        thread_safe = False

    with pytest.raises(E.ConfigError, match="thread-safe"):
        StreamWorker(settings(instances=2), Unsafe(), MemoryBroker(MemoryStore(), "w"))
    with pytest.raises(E.ConfigError, match="instances"):
        settings(instances=0)
