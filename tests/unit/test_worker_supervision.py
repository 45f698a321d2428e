"""A worker whose internal task dies is never a live process that answers nothing.

Each test kills one task for real (an exception raised inside it, where a bug would be)
and checks that the worker fails (``failed`` set, unhealthy, its loop ended without
draining), that its entries stay pending so that another worker takes them once their
lease lapses, and that every request is then answered exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from headrace.client.protocol import Envelope, Request, encode_request
from headrace.workers.backends.fake import AffineServable, affine_reference
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.engine.worker import StreamWorker, WorkerFailed
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore

REPLY = "headrace:{affine}:reply:t"


def settings(**kw: Any) -> WorkerSettings:
    base: dict[str, Any] = dict(model="affine", max_batch=4, max_wait_ms=1, block_ms=5, lease_s=0.3,
                                drain_timeout_s=5, trim_interval_s=0.05)
    base.update(kw)
    return WorkerSettings(**base)


def fields(rid: str, value: float) -> dict[bytes, bytes]:
    return encode_request(Request(Envelope(rid, REPLY), inputs={"x": np.full(4, value, np.float32)}))


async def wait_for(cond: Callable[[], bool], timeout_s: float = 8.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not cond():
        assert loop.time() < give_up, "condition not met in time"
        await asyncio.sleep(0.005)


class Bug(RuntimeError):
    """What a bug in a task raises."""


def _arm(target: object, method: str, after: int = 0) -> list[int]:
    """Make ``target.method`` raise :class:`Bug` from its ``after``-th call on."""
    calls = [0]
    real = getattr(target, method)

    async def boom(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            raise Bug(f"injected into {method}")
        return await real(*args, **kw)

    setattr(target, method, boom)
    return calls


# task name -> how to kill it in a running worker (broker method or runner method)
KILLS: dict[str, tuple[str, str, int]] = {
    "read": ("broker", "read", 1),
    "claim": ("broker", "claim_abandoned", 0),
    "lease": ("broker", "refresh_lease", 0),
    "write": ("broker", "commit", 0),
    "maint": ("broker", "heartbeat", 1),
    "infer-0": ("runner", "run_batch", 0),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("task", list(KILLS))
async def test_a_dead_task_fails_the_worker_and_its_entries_go_to_another(task: str) -> None:
    store = MemoryStore()
    sv = AffineServable(delay_ms=250)  # a batch outlives a lease refresh (every lease_s / 3)
    victim = StreamWorker(settings(), sv, MemoryBroker(store, "victim"))
    where, method, after = KILLS[task]
    target = victim.broker if where == "broker" else victim._runners[0]
    _arm(target, method, after)
    run = asyncio.ensure_future(victim.run())
    for i in range(4):
        store.add(fields(f"r{i}", float(i)))
    await asyncio.wait_for(run, timeout=10)  # the loop ends by itself
    assert isinstance(victim.failed, WorkerFailed) and repr(task) in victim.failed.message
    assert not victim.healthy() and not victim.running
    assert store.registry == {}, "it unregistered"
    for i in range(4, 8):
        store.add(fields(f"r{i}", float(i)))
    rescuer = StreamWorker(settings(), AffineServable(), MemoryBroker(store, "rescuer"))
    rescue = asyncio.ensure_future(rescuer.run())
    try:
        await wait_for(lambda: len(store.results(REPLY)) >= 8)
        await asyncio.sleep(0.2)
    finally:
        await rescuer.stop()
        await rescue
    got: dict[str, list[Any]] = {}
    for res in store.results(REPLY):
        got.setdefault(res.request_id, []).append(res)
    assert sorted(got) == [f"r{i}" for i in range(8)]
    for rid, results in got.items():
        assert len(results) == 1 and results[0].ok, (rid, results)
        np.testing.assert_array_equal(results[0].outputs["y"], affine_reference(np.full(4, float(rid[1:]))))
    assert store.pending_ids() == [] and rescuer.failed is None


@pytest.mark.timeout(30)
def test_worker_thread_reports_the_failure() -> None:
    store = MemoryStore()
    wt = WorkerThread(settings(), AffineServable(), MemoryBroker(store, "w")).start()
    _arm(wt.worker.broker, "heartbeat")
    give_up = time.monotonic() + 10
    while (wt.failed is None or wt.alive) and time.monotonic() < give_up:
        time.sleep(0.01)
    assert wt.failed is not None and "maint" in wt.failed.message
    assert not wt.healthy() and not wt.alive


@pytest.mark.timeout(30)
async def test_a_commit_redis_refuses_is_split_and_blocks_nobody_else() -> None:
    # The DLQ key holds another type: every commit holding a dead letter is refused. The
    # writer splits the commit until the dead letter is alone; the others are answered, and
    # the refused entry stays pending (never acked unrecorded) until the DLQ is writable.
    store = MemoryStore()
    store.wrong_type.add(store.dlq_key)
    w = StreamWorker(settings(max_wait_ms=50, lease_s=0.3), AffineServable(), MemoryBroker(store, "w"))
    with store.lock:
        ids = [store.add(fields(f"r{i}", float(i))) for i in range(3)]
        bad = store.add({b"v": b"1", b"body": b"junk"})  # no id, no reply_to: dead-lettered
        ids += [store.add(fields(f"r{i}", float(i))) for i in range(3, 6)]
    run = asyncio.ensure_future(w.run())
    try:
        await wait_for(lambda: len(store.results(REPLY)) == 6)
        await wait_for(lambda: w.stats().get("commit_refused", 0) >= 1)
        assert bad in store.pending_ids() and not store.dlq and w.healthy()
        store.wrong_type.discard(store.dlq_key)  # the operator fixes the DLQ key
        await wait_for(lambda: len(store.dlq) == 1, timeout_s=10)
    finally:
        await w.stop()
        await run
    assert store.dlq[0][0] == bad and store.pending_ids() == []
    assert sorted(r.request_id for r in store.results(REPLY)) == [f"r{i}" for i in range(6)]
