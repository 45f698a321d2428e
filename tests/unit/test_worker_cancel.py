"""The worker skips requests their producer cancelled (cancel marker checked at admission),
counts them, and publishes its backlog and recent latency in the registry."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from headrace.client.protocol import Envelope, Request, encode_request, now_ms
from headrace.client.registry import WorkerRecord
from headrace.workers.backends.fake import AffineServable
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.metrics import CANCELLED
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from headrace.workers.testing.metrics import InMemoryMetrics

REPLY = "headrace:{affine}:reply:t"


def _fields(rid: str, ts_ms: int) -> dict[bytes, bytes]:
    x = np.full(4, 1.0, np.float32)
    return encode_request(Request(Envelope(rid, REPLY, ts_ms=ts_ms), inputs={"x": x}))


async def _until(cond: object, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not cond():  # type: ignore[operator]
        assert loop.time() < give_up, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.mark.timeout(20)
async def test_cancelled_requests_are_acked_unanswered_and_counted() -> None:
    store = MemoryStore()
    metrics = InMemoryMetrics()
    servable = AffineServable()
    settings = WorkerSettings(model="affine", max_batch=8, max_wait_ms=1, block_ms=5, lease_s=5, trim_interval_s=0.05)
    worker = StreamWorker(settings, servable, MemoryBroker(store, "w1"), metrics)
    t0 = now_ms() - 1000
    store.cancel("gone-1", t0)           # cancelled after it was submitted
    store.cancel("gone-2", t0 + 500)
    store.cancel("later", t0 - 1)        # a marker older than this submission does not apply
    for rid in ("gone-1", "keep", "gone-2", "later"):
        store.add(_fields(rid, t0))
    task = asyncio.ensure_future(worker.run())
    try:
        await _until(lambda: len(store.results(REPLY)) == 2 and not store.pending_ids())
        store.add(_fields("gone-1", now_ms()))  # a fresh submission of a cancelled id runs
        await _until(lambda: len(store.results(REPLY)) == 3)
        facts = worker.registry_facts()
    finally:
        await worker.stop()
        await task
    answered = sorted(r.request_id for r in store.results(REPLY))
    assert answered == ["gone-1", "keep", "later"]
    assert "gone-2" not in servable.invocations and servable.invocations["gone-1"] == 1
    assert metrics.count(CANCELLED) == 2 and worker.stats()["cancelled"] == 2
    assert not store.pending_ids() and store.undelivered() == 0  # skipped ones are acked too
    rec = WorkerRecord.decode("w1", {**facts, "seen_ms": 1})
    assert rec is not None and rec.p50_ms > 0 and rec.p99_ms >= rec.p50_ms and rec.max_batch == 8
